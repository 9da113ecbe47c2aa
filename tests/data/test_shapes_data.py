"""The shapes benchmark generator, the shipped splits, and the JSONL loader's validation."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calib_data.shapes import COLORS, DIGITS, SHAPES, SPLITS, TASKS, make_sample, render, vocabulary
from calib_data.shapes.__main__ import write_split
from quota_export import UserError
from quota_export.data import BenchSample, load_bench, load_image

torch.set_num_threads(1)

SHAPES_DIR = Path(__file__).resolve().parents[2] / "calib_data" / "shapes"
SPLIT_FILES = {name: SHAPES_DIR / f"{name}.jsonl" for name in SPLITS}


# ---------------------------------------------------------------------------- answer checking


def _check_answer(scene, q: dict) -> None:
    """Recompute the answer of question `q` from the scene's objects."""
    shapes = scene.shapes
    task, question, answer = q["task"], q["question"], q["answer"]
    words = set(question.split())
    assert words <= set(vocabulary()), f"out-of-vocabulary words: {words - set(vocabulary())}"
    if task == "exist":
        m = re.fullmatch(r"is there a (\w+) (\w+) \?", question)
        color, kind = m.groups()
        present = any(o.color == color and o.kind == kind for o in shapes)
        assert answer == ("yes" if present else "no")
    elif task == "attribute":
        m = re.fullmatch(r"what color is the (\w+) \?", question)
        if m:
            (match,) = [o for o in shapes if o.kind == m.group(1)]
            assert answer == match.color
        else:
            m = re.fullmatch(r"what shape is the (\w+) object \?", question)
            (match,) = [o for o in shapes if o.color == m.group(1)]
            assert answer == match.kind
    elif task == "count":
        m = re.fullmatch(r"how many (\w+) shapes are there \?", question)
        x = m.group(1)
        assert x in COLORS or x in SHAPES
        n = sum(o.kind == x or o.color == x for o in shapes)
        assert answer == str(n)
    elif task == "spatial":
        m = re.fullmatch(r"where is the (\w+) (\w+) relative to the (\w+) (\w+) \?", question)
        c1, k1, c2, k2 = m.groups()
        (a,) = [o for o in shapes if (o.color, o.kind) == (c1, k1)]
        (b,) = [o for o in shapes if (o.color, o.kind) == (c2, k2)]
        if a.row == b.row:
            assert answer == ("left" if a.col < b.col else "right")
        else:
            assert a.col == b.col
            assert answer == ("above" if a.row < b.row else "below")
    elif task == "choice":
        opts = q["options"]
        assert len(opts) == 4 and len(set(opts)) == 4
        assert answer in "ABCD" and len(answer) == 1
        assert question.endswith(" ".join(f"{L} . {v}" for L, v in zip("ABCD", opts)))
        truth = opts["ABCD".index(answer)]
        m = re.match(r"which color is the (\w+) \?", question)
        if m:
            assert set(opts) <= set(COLORS)
            (match,) = [o for o in shapes if o.kind == m.group(1)]
            assert truth == match.color
        else:
            m = re.match(r"which shape is the (\w+) object \?", question)
            assert set(opts) <= set(SHAPES)
            (match,) = [o for o in shapes if o.color == m.group(1)]
            assert truth == match.kind
    elif task == "digit":
        assert question == "what digit is written ?"
        assert answer in DIGITS and answer == scene.digit.digit
    else:
        raise AssertionError(f"unknown task {task!r}")
    if task != "choice":
        assert "options" not in q


# ---------------------------------------------------------------------------- generator


def test_generator_is_deterministic(tmp_path):
    a = write_split(tmp_path / "a" / "mini.jsonl", seed=12345, n=14, progress=False)
    b = write_split(tmp_path / "b" / "mini.jsonl", seed=12345, n=14, progress=False)
    assert a.read_bytes() == b.read_bytes()
    pngs_a = sorted((a.parent / "images" / "mini").glob("*.png"))
    pngs_b = sorted((b.parent / "images" / "mini").glob("*.png"))
    assert [p.name for p in pngs_a] == [p.name for p in pngs_b] and len(pngs_a) == 14
    for pa, pb in zip(pngs_a, pngs_b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    # and a different seed gives different data
    c = write_split(tmp_path / "c" / "mini.jsonl", seed=54321, n=14, progress=False)
    assert c.read_bytes() != a.read_bytes()


def test_generated_split_covers_tasks_and_loads(tmp_path):
    out = write_split(tmp_path / "mini.jsonl", seed=777, n=18, progress=False)
    samples = load_bench(out)
    assert len(samples) == 18
    assert Counter(s.task for s in samples) == {t: 3 for t in TASKS}
    for s in samples:
        img = load_image(s)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        assert (s.options is not None) == (s.task == "choice")


def test_answers_are_valid():
    for i in range(240):  # 40 per task
        scene, q = make_sample(31337 + i, TASKS[i % len(TASKS)])
        assert q["task"] == TASKS[i % len(TASKS)]
        _check_answer(scene, q)


# ---------------------------------------------------------------------------- shipped splits


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_shipped_split_loads(name):
    path = SPLIT_FILES[name]
    seed, n = SPLITS[name]
    samples = load_bench(path)
    assert len(samples) == n
    assert len({s.id for s in samples}) == n
    counts = Counter(s.task for s in samples)
    assert set(counts) == set(TASKS)
    assert max(counts.values()) - min(counts.values()) <= 1
    for s in samples:
        assert Path(s.image).is_absolute() and Path(s.image).is_file()
        with Image.open(s.image) as im:  # header only
            assert im.size == (96, 96) and im.mode == "RGB", s.image
    for s in samples[:: max(1, n // 12)]:
        img = load_image(s)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_shipped_split_matches_generator(name):
    """Every shipped answer is right for its scene; the first images are the rendered scenes."""
    seed, n = SPLITS[name]
    samples = load_bench(SPLIT_FILES[name])
    for i, s in enumerate(samples):
        scene, q = make_sample(seed + i, TASKS[i % len(TASKS)])
        assert (s.id, s.question, s.answer, s.task) == (f"{name}-{i:05d}", q["question"], q["answer"], q["task"])
        assert s.options == q.get("options")
        _check_answer(scene, q)
        if i < 24:
            np.testing.assert_array_equal(load_image(s), render(scene))


def test_limit_is_task_balanced_on_shipped_split():
    full = load_bench(SPLIT_FILES["test"])
    six = load_bench(SPLIT_FILES["test"], limit=6)
    assert sorted(s.task for s in six) == sorted(TASKS)
    sub = load_bench(SPLIT_FILES["test"], limit=15)
    counts = Counter(s.task for s in sub)
    assert set(counts) == set(TASKS) and set(counts.values()) == {2, 3}
    order = {s.id: i for i, s in enumerate(full)}
    assert [order[s.id] for s in sub] == sorted(order[s.id] for s in sub)  # file order


# ---------------------------------------------------------------------------- load_bench validation


@pytest.fixture
def bench(tmp_path):
    """Write JSONL lines (dicts or raw strings) next to a real image; return the path."""
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "img" / "a.png")

    def write(*lines, name="b.jsonl"):
        path = tmp_path / name
        path.write_text(
            "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
        )
        return path

    return write


def rec(i="s0", task="t", **kw):
    r = {"id": i, "image": "img/a.png", "question": "q ?", "answer": "yes", "task": task}
    r.update(kw)
    return r


def _err(path, *a, **kw) -> str:
    with pytest.raises(UserError) as ei:
        load_bench(path, *a, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_valid_file(bench, tmp_path):
    path = bench(rec("a"), "", rec("b", options=["x", "y"]), rec("c", options=None))
    s = load_bench(path)
    assert [x.id for x in s] == ["a", "b", "c"]
    assert s[0] == BenchSample("a", str(tmp_path / "img" / "a.png"), "q ?", "yes", "t", None)
    assert s[1].options == ["x", "y"] and s[2].options is None
    assert load_image(s[0]).shape == (4, 5, 3)


def test_bad_json(bench):
    path = bench(rec("a"), '{"id": "b", ')
    assert _err(path).startswith(f"{path}:2: invalid JSON")


def test_not_an_object(bench):
    path = bench('["a", "b"]')
    assert _err(path) == f"{path}:1: expected a JSON object, got list"


@pytest.mark.parametrize("field", ["id", "image", "question", "answer", "task"])
def test_missing_field(bench, field):
    r = rec("a")
    del r[field]
    path = bench(rec("z"), r)
    assert _err(path) == f"{path}:2: missing field {field!r}"


def test_wrong_type(bench):
    path = bench(rec("a", question=3))
    assert _err(path) == f"{path}:1: field 'question': expected a string, got int"


def test_wrong_type_id(bench):
    path = bench(rec(7))
    assert _err(path) == f"{path}:1: field 'id': expected a string, got int"


def test_empty_string(bench):
    path = bench(rec("a", answer=" "))
    assert _err(path) == f"{path}:1: field 'answer': must not be empty"


def test_options_not_a_list(bench):
    path = bench(rec("a", options="A B"))
    assert _err(path) == f"{path}:1: field 'options': expected a list of strings, got str"


def test_options_item_not_a_string(bench):
    path = bench(rec("a", options=["x", 2]))
    assert _err(path) == f"{path}:1: field 'options': item 1: expected a string, got int"


def test_unknown_field(bench):
    path = bench(rec("a", extra=1))
    msg = _err(path)
    assert msg.startswith(f"{path}:1: unknown field 'extra'")


def test_image_missing(bench, tmp_path):
    path = bench(rec("a"), rec("b", image="img/nope.png"))
    assert _err(path) == f"{path}:2: field 'image': file not found: {tmp_path / 'img' / 'nope.png'}"


def test_duplicate_id(bench):
    path = bench(rec("a"), rec("b"), rec("a"))
    assert _err(path) == f"{path}:3: field 'id': duplicate id 'a' (first on line 1)"


def test_empty_file(bench):
    path = bench("")
    assert _err(path) == f"{path}: no samples"


def test_file_not_found(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert _err(path) == f"benchmark file not found: {path}"


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_bad_limit(bench, limit):
    path = bench(rec("a"))
    assert _err(path, limit=limit).startswith("limit must be a positive integer")


def test_limit_round_robin(bench):
    tasks = ["a", "a", "a", "a", "b", "c", "b", "a", "c"]
    path = bench(*[rec(f"s{i}", task=t) for i, t in enumerate(tasks)])
    ids = lambda n: [s.id for s in load_bench(path, limit=n)]  # noqa: E731
    assert ids(1) == ["s0"]
    assert ids(3) == ["s0", "s4", "s5"]
    assert ids(5) == ["s0", "s1", "s4", "s5", "s6"]
    assert ids(7) == ["s0", "s1", "s2", "s4", "s5", "s6", "s8"]
    assert ids(8) == ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s8"]
    assert ids(9) == ids(100) == [f"s{i}" for i in range(9)]
    for n in range(1, 9):  # nested
        assert set(ids(n)) <= set(ids(n + 1))
