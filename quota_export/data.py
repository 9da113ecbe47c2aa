"""Benchmark / calibration samples: the JSONL format the project reads, validated line by line.

One JSON object per line (blank lines are skipped):

    {"id": str, "image": str, "question": str, "answer": str, "task": str, "options": [str, ...]?}

`image` is relative to the JSONL file's folder (an absolute path is taken as is); `options` is
optional (absent or null -> None). Any problem raises `quota_export.UserError` with a one-line
message naming `file:line` and the field, e.g.

    error: calib_data/shapes/test.jsonl:17: field 'answer': expected a string, got int
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quota_export import UserError

_STR_FIELDS = ("id", "image", "question", "answer", "task")
_OPTIONAL_FIELDS = ("options",)
_KNOWN = frozenset(_STR_FIELDS + _OPTIONAL_FIELDS)


@dataclass(frozen=True)
class BenchSample:
    """One visual question. `image` is an absolute path; `options` is None unless multiple choice."""

    id: str
    image: str
    question: str
    answer: str
    task: str
    options: list[str] | None = None


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def _parse_line(raw: str, where: str, base: Path) -> BenchSample:
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {_type_name(rec)}")
    unknown = sorted(set(rec) - _KNOWN)
    if unknown:
        raise UserError(
            f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_KNOWN))})"
        )
    for key in _STR_FIELDS:
        if key not in rec:
            raise UserError(f"{where}: missing field {key!r}")
        v = rec[key]
        if not isinstance(v, str):
            raise UserError(f"{where}: field {key!r}: expected a string, got {_type_name(v)}")
        if not v.strip():
            raise UserError(f"{where}: field {key!r}: must not be empty")
    options = rec.get("options")
    if options is not None:
        if not isinstance(options, list):
            raise UserError(
                f"{where}: field 'options': expected a list of strings, got {_type_name(options)}"
            )
        for j, o in enumerate(options):
            if not isinstance(o, str):
                raise UserError(
                    f"{where}: field 'options': item {j}: expected a string, got {_type_name(o)}"
                )
        options = list(options)
    image = Path(os.path.normpath(os.path.abspath(base / rec["image"])))
    if not image.is_file():
        raise UserError(f"{where}: field 'image': file not found: {image}")
    return BenchSample(
        id=rec["id"],
        image=str(image),
        question=rec["question"],
        answer=rec["answer"],
        task=rec["task"],
        options=options,
    )


def _balanced(samples: list[BenchSample], limit: int) -> list[BenchSample]:
    """The first `limit` samples taken round-robin over tasks (tasks in order of first
    appearance, samples of a task in file order), returned in file order. Deterministic, and
    nested: the selection for `limit` is contained in the selection for `limit + 1`."""
    by_task: OrderedDict[str, list[int]] = OrderedDict()
    for i, s in enumerate(samples):
        by_task.setdefault(s.task, []).append(i)
    chosen: list[int] = []
    rnd = 0
    while len(chosen) < limit:
        took = False
        for idx in by_task.values():
            if rnd < len(idx) and len(chosen) < limit:
                chosen.append(idx[rnd])
                took = True
        if not took:
            break
        rnd += 1
    return [samples[i] for i in sorted(chosen)]


def load_bench(path: str | os.PathLike, limit: int | None = None) -> list[BenchSample]:
    """Read and validate a benchmark JSONL file.

    `limit=None` returns every sample in file order. `limit=N` returns N of them chosen
    task-balanced (round-robin over tasks in order of first appearance, each task's samples in
    file order), returned in file order, so a small slice covers every task.
    """
    path = Path(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise UserError(f"limit must be a positive integer, got {limit!r}")
    if not path.is_file():
        raise UserError(f"benchmark file not found: {path}")
    base = path.parent
    samples: list[BenchSample] = []
    first_line: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        s = _parse_line(raw, where, base)
        if s.id in first_line:
            raise UserError(
                f"{where}: field 'id': duplicate id {s.id!r} (first on line {first_line[s.id]})"
            )
        first_line[s.id] = lineno
        samples.append(s)
    if not samples:
        raise UserError(f"{path}: no samples")
    if limit is not None and limit < len(samples):
        samples = _balanced(samples, limit)
    return samples


def load_image(sample: BenchSample | str | os.PathLike) -> np.ndarray:
    """The sample's image as uint8 HxWx3 RGB (PIL, converted to RGB)."""
    from PIL import Image, UnidentifiedImageError

    p = sample.image if isinstance(sample, BenchSample) else os.fspath(sample)
    try:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"image not found: {p}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {p}: {e}") from None
    return np.ascontiguousarray(arr)
