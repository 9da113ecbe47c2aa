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
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
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
    where: str = field(default="", compare=False)  # "file:line" it was read from, for messages


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def _parse_line(raw: str, where: str, base: Path) -> BenchSample:
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{where}: invalid JSON (nested too deeply)") from None
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
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"{where}: field {key!r}: not valid Unicode (a lone surrogate escape)") from None
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
        where=where,
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


def _lines(path: Path):
    """(line number, text) of a JSONL file, read line by line; a line over MAX_JSONL_LINE bytes or
    not UTF-8 is a UserError naming file:line."""
    from quota_export.limits import MAX_JSONL_LINE

    try:
        with open(path, "rb") as f:
            lineno = 0
            while raw := f.readline(MAX_JSONL_LINE + 1):
                lineno += 1
                if len(raw) > MAX_JSONL_LINE:
                    raise UserError(f"{path}:{lineno}: line longer than the limit of {MAX_JSONL_LINE} bytes")
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


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
    for lineno, raw in _lines(path):
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
    """The sample's image as uint8 HxWx3 RGB (PIL, converted to RGB). Its size is read from the
    header first: more than limits.MAX_IMAGE_PIXELS pixels is refused before decoding. Errors
    name the JSONL file and line of a benchmark sample."""
    from PIL import Image, UnidentifiedImageError

    from quota_export.limits import MAX_IMAGE_PIXELS

    p = sample.image if isinstance(sample, BenchSample) else os.fspath(sample)
    label = f"{sample.where}: field 'image': {p}" if isinstance(sample, BenchSample) and sample.where else str(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by our own limit
            with Image.open(p) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise UserError(f"{label}: image is {w}x{h} ({w * h} pixels), more than the limit of "
                                    f"{MAX_IMAGE_PIXELS} (not decoded)")
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"{label}: image not found") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{label}: image too large ({e}); the limit is {MAX_IMAGE_PIXELS} pixels (not decoded)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise UserError(f"{label}: cannot read image ({e})") from None
    return np.ascontiguousarray(arr)
