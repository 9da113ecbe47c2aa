"""Hostile inputs (issue: reliability): every case ends in one `error: ...` line and exit 2 (or
works, where it is legitimate); nothing a user wrote is deleted; nothing outside the artifacts
folder is read; an interrupted build leaves nothing behind after the next run. docs/reliability.md.

Groups: publishing (markers, foreign files, crash recovery, leftovers), regex budget, the CLI's
one error path (images, nesting, text), manifest confinement and hashes, limits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import ROOT
from test_cli_errors import TEST_SPLIT, cli, one_error, recipe

from quota_export import UserError, limits, publish
from quota_export.__main__ import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def png_header(path: Path, w: int, h: int) -> Path:
    """A PNG that declares w x h pixels in its header (and holds no pixel data): what a
    decompression bomb looks like to a reader that checks the header first."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def red(path: Path, w: int = 96, h: int = 96) -> Path:
    from PIL import Image

    Image.new("RGB", (w, h), (200, 30, 30)).save(path)
    return path


def jsonl(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def sample(image: Path | str, question: str = "what color is the square ?") -> str:
    return json.dumps({"id": "s0", "image": str(image), "question": question, "answer": "red", "task": "attribute"})


def build_cli(capsys, r: Path, out: Path, *extra):
    return cli(capsys, "build", "--recipe", r, "--out", out, "--bench", TEST_SPLIT, "--samples", 1, *extra)


@pytest.fixture(scope="module")
def good(tiny_llava, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, build folder) of one real build of the tiny LLaVA."""
    d = tmp_path_factory.mktemp("hostile")
    r = recipe(d / "r.yaml", tiny_llava)
    assert main(["build", "--recipe", str(r), "--out", str(d / "out"), "--bench", str(TEST_SPLIT), "--samples", "1"]) == 0
    return r, d / "out"


@pytest.fixture
def art(good, tmp_path) -> Path:
    """A private copy of the good build, to damage."""
    return Path(shutil.copytree(good[1], tmp_path / "art", symlinks=True))


def run(capsys, artifacts, image, prompt="what color is the square ?", *extra):
    return cli(capsys, "run", "--artifacts", artifacts, "--image", image, "--prompt", prompt, *extra)


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def siblings(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---------------------------------------------------------------- publishing: only our folders


def test_folder_with_a_bare_manifest_is_not_replaced(capsys, tmp_path, tiny_llava):
    """A web project with a manifest.json is not a build: refused before any work, untouched."""
    site = tmp_path / "site"
    (site / "src").mkdir(parents=True)
    for f, text in {"manifest.json": "{}", "index.html": "<html>", "src/app.js": "app()"}.items():
        (site / f).write_text(text)
    before = snapshot(site)
    rc, _, err = build_cli(capsys, recipe(tmp_path / "r.yaml", tiny_llava), site)
    one_error(rc, err, str(site), "not a previous build", ".quota_export")
    assert err.count("\n") == 1 and snapshot(site) == before


def test_out_dot_is_refused_up_front(capsys, tmp_path, tiny_llava, monkeypatch):
    r = recipe(tmp_path / "r.yaml", tiny_llava)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path)):
        rc, _, err = build_cli(capsys, r, out)
        one_error(rc, err, "current folder")
        assert err.count("\n") == 1  # before loading anything
    assert list(work.iterdir()) == []


def test_rebuild_keeps_what_the_user_added(capsys, good, tmp_path):
    """Rebuild into a build folder: report/ (written there by `report`) and the user's NOTES.txt
    stay; a sibling .<name>.old stays; the build's own files are the new build's."""
    r, first = good
    out = Path(shutil.copytree(first, tmp_path / "out"))
    (out / "NOTES.txt").write_text("my notes")
    (out / "report").mkdir()
    (out / "report" / "report.md").write_text("# report")
    (out / "processor" / "mine.txt").write_text("inside a build folder too")
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "keep.txt").write_text("not ours")
    rc, _, err = build_cli(capsys, r, out)
    assert rc == 0, err
    assert (out / "NOTES.txt").read_text() == "my notes"
    assert (out / "report" / "report.md").read_text() == "# report"
    assert (out / "processor" / "mine.txt").read_text() == "inside a build folder too"
    assert (tmp_path / ".out.old" / "keep.txt").read_text() == "not ours"
    assert siblings(tmp_path, "out") == [".out.old"]  # no temporary folder, journal or old build left
    new = publish.read_marker(out)
    assert new["build_id"] != publish.read_marker(first)["build_id"]
    assert set(new["files"]) == set(publish.read_marker(first)["files"])  # the user's files are not ours
    assert (out / "prefill.onnx").read_bytes() == (first / "prefill.onnx").read_bytes()


def test_rebuild_refuses_to_overwrite_an_edited_file(capsys, good, tmp_path):
    """recipe.yaml edited in the build folder is the user's now: the new build would overwrite it,
    so it is refused with the file named, and nothing changes."""
    r, first = good
    out = Path(shutil.copytree(first, tmp_path / "out"))
    (out / "recipe.yaml").write_text((out / "recipe.yaml").read_text() + "# my edit\n")
    before = snapshot(out)
    rc, _, err = build_cli(capsys, r, out)
    one_error(rc, err, str(out / "recipe.yaml"), "not written by the previous build")
    assert snapshot(out) == before
    assert siblings(tmp_path, "out") == []


def test_foreign_entries_and_collisions():
    """The rules on a hand-made folder: own = listed and unchanged; the rest is the user's."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "processor").mkdir()
        for f in ("a.onnx", "processor/p.json", "processor/extra.txt", "NOTES.txt"):
            (d / f).write_text(f)
        (d / "report").mkdir()
        (d / "report" / "r.md").write_text("r")
        os.symlink("/etc/passwd", d / "link")
        marker = {"build_id": "x", "files": {f: publish.file_entry(d / f) for f in ("a.onnx", "processor/p.json")}}
        marker["files"]["gone.onnx"] = {"bytes": 1, "sha256": "0"}
        own = publish.own_files(d, marker)
        assert own == {"a.onnx", "processor/p.json"}
        assert publish.foreign_entries(d, own) == ["NOTES.txt", "link", "processor/extra.txt", "report"]
        (d / "a.onnx").write_text("edited")
        assert publish.own_files(d, marker) == {"processor/p.json"}
        new = d / "new"
        new.mkdir()
        (new / "a.onnx").write_text("new")
        assert publish._collisions(["a.onnx", "report", "NOTES.txt"], new) == ["a.onnx"]


# ---------------------------------------------------------------- publishing: crashes and leftovers


def _fake_build(out: Path, files: dict[str, str]) -> Path:
    tmp, _ = publish.make_tmp(out)
    for rel, text in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    return tmp


def test_crash_between_the_two_renames_is_restored(tmp_path, monkeypatch):
    """The process dies after moving the old build aside, before the new one is in place: --out is
    missing; the next run puts the old build back and removes the new temporary folder."""
    out = tmp_path / "out"
    publish.publish(_fake_build(out, {"g.onnx": "v1"}), out)
    (out / "NOTES.txt").write_text("mine")
    tmp = _fake_build(out, {"g.onnx": "v2"})
    real, calls = os.replace, []

    def dying_replace(a, b):
        calls.append((a, b))
        if len(calls) == 3:  # journal, out -> old, then tmp -> out: die here
            raise SystemExit("killed")
        return real(a, b)

    monkeypatch.setattr(publish.os, "replace", dying_replace)
    with pytest.raises(SystemExit):
        publish.publish(tmp, out)
    monkeypatch.setattr(publish.os, "replace", real)
    publish._ACTIVE.clear()  # as in a new process
    assert not out.exists() and any(n.startswith(".out.quota-old-") for n in siblings(tmp_path, "out"))
    publish.claim(out)
    assert (out / "g.onnx").read_text() == "v1" and (out / "NOTES.txt").read_text() == "mine"
    assert siblings(tmp_path, "out") == []


def test_crash_after_the_swap_is_finished(tmp_path, monkeypatch):
    """The process dies after the new build is in place, before the user's files are carried over
    and the old build is deleted: the next run finishes the job."""
    out = tmp_path / "out"
    publish.publish(_fake_build(out, {"g.onnx": "v1", "only-v1.onnx": "x"}), out)
    (out / "NOTES.txt").write_text("mine")
    monkeypatch.setattr(publish, "_finish", lambda old, new: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        publish.publish(_fake_build(out, {"g.onnx": "v2"}), out)
    monkeypatch.undo()
    publish._ACTIVE.clear()
    assert not (out / "NOTES.txt").exists()  # still in the old build's folder, next to out
    publish.claim(out)
    assert (out / "g.onnx").read_text() == "v2" and (out / "NOTES.txt").read_text() == "mine"
    assert not (out / "only-v1.onnx").exists()
    assert siblings(tmp_path, "out") == []


def test_leftover_of_a_dead_build_is_removed_live_ones_are_not(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    left = tmp_path / f".out.quota-build-{pid}-abcd1234"
    left.mkdir()
    (left / "prefill.onnx").write_text("half")
    (left / publish.MARKER).write_text(json.dumps({"build_id": "b", "pid": pid, "state": "building"}))
    live = tmp_path / f".out.quota-build-{os.getppid()}-abcd1234"  # a running process (pytest's parent)
    live.mkdir()
    (live / publish.MARKER).write_text(json.dumps({"build_id": "c", "pid": os.getppid(), "state": "building"}))
    foreign = tmp_path / ".out.quota-build-1-notours"  # our name, no marker: not ours
    foreign.mkdir()
    said = []
    publish.claim(out, said.append)
    assert not left.exists() and live.exists() and foreign.exists()
    assert said == [f"      removed {left.name}, left by an interrupted build"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_build_leaves_nothing_after_the_next_run(tmp_path, tiny_llava, sig):
    """SIGTERM: the build removes its temporary folder itself (exit 143). SIGKILL: the folder
    stays until the next build next to the same --out removes it."""
    r = recipe(tmp_path / "r.yaml", tiny_llava)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "quota_export", "build", "--recipe", str(r), "--out", str(out),
                          "--bench", str(TEST_SPLIT), "--samples", "4"], env=ENV, cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any((d / "manifest.json").exists() for d in tmp_path.glob(".out.quota-build-*")):  # parity runs
        assert p.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.05)
    p.send_signal(sig)
    err = p.communicate(timeout=60)[1]
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert p.returncode == 143 and err.splitlines()[-1] == "error: terminated", err
        assert siblings(tmp_path, "out") == []
        return
    assert [n for n in siblings(tmp_path, "out") if n.startswith(".out.quota-build-")]
    publish.claim(out)
    assert siblings(tmp_path, "out") == []


# ---------------------------------------------------------------- regexes


@pytest.mark.parametrize("field", ["ignore", "targets"])
def test_catastrophic_regex_is_one_line_not_a_hang(capsys, tmp_path, tiny_llava, monkeypatch, field):
    monkeypatch.setattr(limits, "REGEX_BUDGET_S", 1.0)
    w = {"bits": 4, "ignore": ["lm_head", "vision_tower", "multi_modal_projector"]}
    w[field] = w.get(field, []) + [r"^(([a-z_.0-9]+)+)+X$"]
    if field == "targets":
        w["targets"] = [r"^model\.language_model\.layers\.\d+\.", r"^(([a-z_.0-9]+)+)+X$"]
    r = recipe(tmp_path / "r.yaml", tiny_llava, quant={"scheme": "w4a4kv4", "weights": w})
    idx = 3 if field == "ignore" else 1
    rc, _, err = build_cli(capsys, r, tmp_path / "out")  # a hang before: the child is killed past 1 s
    one_error(rc, err, f"quant.weights.{field}.{idx}", "takes more than 1 s", "backtracks catastrophically")
    assert siblings(tmp_path, "out") == []


def test_regex_budget_matches_like_re():
    import re

    names = ["model.layers.0.q_proj", "lm_head", "vision_tower.x"]
    pats = [("a", "lm_head"), ("b", r"^model\.layers\.\d+\."), ("c", "nothing")]
    assert limits.match_within_budget(pats, names) == [[i for i, n in enumerate(names) if re.search(p, n)]
                                                       for _, p in pats]


def test_overlong_pattern_is_refused(tmp_path, tiny_llava):
    from quota_export.recipe import load_recipe

    r = recipe(tmp_path / "r.yaml", tiny_llava, quant={"scheme": "w4a4kv4", "weights": {"bits": 4, "ignore": ["a" * 2000]}})
    with pytest.raises(UserError, match=r"quant\.weights\.ignore\.0: pattern of 2000 characters"):
        load_recipe(r)


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("side", [20000, 10000])
def test_huge_image_refused_from_its_header(capsys, art, tmp_path, side):
    """20000^2 (PIL's own bomb error) and 10000^2 (under PIL's, over ours): one line, not decoded."""
    img = png_header(tmp_path / "big.png", side, side)
    rc, _, err = run(capsys, art, img)
    one_error(rc, err, str(img), "not decoded")


def test_huge_image_in_a_benchmark_names_file_and_line(capsys, art, tmp_path):
    bench = jsonl(tmp_path / "b.jsonl", sample(red(tmp_path / "ok.png")),
                  sample(png_header(tmp_path / "big.png", 20000, 20000)).replace('"s0"', '"s1"'))
    rc, _, err = cli(capsys, "verify", "--artifacts", art, "--bench", bench, "--samples", 2)
    one_error(rc, err, f"{bench}:2: field 'image'", "big.png", "not decoded")


def test_huge_image_in_build_bench(capsys, tmp_path, tiny_llava):
    bench = jsonl(tmp_path / "b.jsonl", sample(png_header(tmp_path / "big.png", 20000, 20000)))
    rc, _, err = cli(capsys, "build", "--recipe", recipe(tmp_path / "r.yaml", tiny_llava), "--out", tmp_path / "out",
                     "--bench", bench, "--samples", 1)
    one_error(rc, err, f"{bench}:1: field 'image'", "not decoded")
    assert not (tmp_path / "out").exists() and siblings(tmp_path, "out") == []


def test_broken_image_names_file_and_line(capsys, art, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(red(tmp_path / "ok.png").read_bytes()[:60])  # truncated
    bench = jsonl(tmp_path / "b.jsonl", sample(bad))
    rc, _, err = cli(capsys, "verify", "--artifacts", art, "--bench", bench, "--samples", 1)
    one_error(rc, err, f"{bench}:1: field 'image'", "cannot read image")


# ---------------------------------------------------------------- nesting, text, sizes of inputs


def test_deeply_nested_yaml_recipe(capsys, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("name: " + "[" * 100000)
    rc, _, err = cli(capsys, "build", "--recipe", r, "--out", tmp_path / "out")
    one_error(rc, err, str(r), "nested too deeply")


def test_recipe_file_over_the_size_limit(capsys, tmp_path, tiny_llava):
    r = recipe(tmp_path / "r.yaml", tiny_llava)
    with open(r, "a") as f:
        f.write(("# " + "x" * 1000 + "\n") * (limits.MAX_RECIPE_BYTES // 1000))
    rc, _, err = cli(capsys, "build", "--recipe", r, "--out", tmp_path / "out")
    one_error(rc, err, str(r), "larger than the limit")


def test_deeply_nested_jsonl_line(capsys, art, tmp_path):
    bench = jsonl(tmp_path / "b.jsonl", '{"id": ' + "[" * 50000)
    rc, _, err = cli(capsys, "verify", "--artifacts", art, "--bench", bench)
    one_error(rc, err, f"{bench}:1", "nested too deeply")


def test_jsonl_line_over_the_limit(capsys, art, tmp_path):
    bench = jsonl(tmp_path / "b.jsonl", sample(red(tmp_path / "ok.png"), "what " * limits.MAX_JSONL_LINE))
    rc, _, err = cli(capsys, "verify", "--artifacts", art, "--bench", bench)
    one_error(rc, err, f"{bench}:1", "longer than the limit")


def test_jsonl_lone_surrogate(capsys, art, tmp_path):
    bench = jsonl(tmp_path / "b.jsonl", sample(red(tmp_path / "ok.png"), "what XX ?").replace("XX", "\\udcff"))
    rc, _, err = cli(capsys, "verify", "--artifacts", art, "--bench", bench)
    one_error(rc, err, f"{bench}:1", "field 'question'", "not valid Unicode")


@pytest.mark.parametrize("prompt,needle", [("what \udcff ?", "not valid UTF-8"), ("", "must not be empty"),
                                           ("   ", "must not be empty")])
def test_bad_prompt(capsys, art, tmp_path, prompt, needle):
    rc, _, err = run(capsys, art, red(tmp_path / "ok.png"), prompt)
    one_error(rc, err, "--prompt", needle)


def test_non_utf8_prompt_bytes_on_the_real_command_line(good, tmp_path):
    img = red(tmp_path / "ok.png")
    p = subprocess.run([sys.executable.encode(), b"-m", b"quota_export", b"run", b"--artifacts", str(good[1]).encode(),
                        b"--image", str(img).encode(), b"--prompt", b"what \xff ?"],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and p.stdout == "", p.stderr
    assert p.stderr.splitlines() == [p.stderr.splitlines()[-1]] and "--prompt: not valid UTF-8" in p.stderr


def test_prompt_longer_than_the_chat_template_slot(art):
    """The shipped model's template pads the question before the image to a 24-word slot, so the
    image sits at a fixed token; a longer question moves it: a clear line, not one about positions."""
    import numpy as np

    from calib_data.shapes.model import LAYOUTS, QUESTION_SLOT
    from quota_export.runtime.ort import OrtRunner

    runner = OrtRunner(art)
    runner.processor.chat_template = LAYOUTS["slot"]  # the tiny model's template has no slot
    runner.visual_start = 3 + QUESTION_SLOT  # "<s> USER :" + the slot
    assert runner.encode(np.zeros((96, 96, 3), np.uint8), "what color is the square ?")[0].shape[1] > 0
    q = " ".join(["what color is the square"] * 6) + " ?"  # 31 words
    with pytest.raises(UserError, match="prompt too long for the model's chat template.*shorten the question"):
        runner.encode(np.zeros((96, 96, 3), np.uint8), q)


def test_max_new_tokens_bounds(capsys, art, tmp_path):
    img = red(tmp_path / "ok.png")
    rc, _, err = run(capsys, art, img, "what color is the square ?", "--max-new-tokens", limits.MAX_NEW_TOKENS + 1)
    one_error(rc, err, "--max-new-tokens", f"1 to {limits.MAX_NEW_TOKENS}")
    rc, _, err = run(capsys, art, img, "what color is the square ?", "--max-new-tokens", 700)
    one_error(rc, err, "max_new_tokens 700", "sequence limit 256", "at most")


def test_generate_stops_at_max_seq_through_the_api(art):
    import numpy as np

    from quota_export.runtime.ort import OrtRunner

    runner = OrtRunner(art)
    img = np.zeros((96, 96, 3), np.uint8)
    with pytest.raises(UserError, match="sequence limit 256"):
        runner.generate(img, "what color is the square ?", 700)
    ids, _ = runner.encode(img, "what color is the square ?")
    res = runner.generate(img, "what color is the square ?", runner.max_seq() - ids.shape[1])  # exactly fits
    assert 1 <= len(res.tokens) <= runner.max_seq() - ids.shape[1]


@pytest.mark.parametrize("export,needle", [({"max_seq": 100000}, "max_position_embeddings 512"),
                                           ({"max_seq": 100}, "is less than")])
def test_recipe_max_seq_checked_against_model_and_prompt(capsys, tmp_path, tiny_llava, export, needle):
    r = recipe(tmp_path / "r.yaml", tiny_llava, export={"max_new_tokens": 2, **export})
    rc, _, err = build_cli(capsys, r, tmp_path / "out")
    one_error(rc, err, "export.max_seq", needle)
    assert siblings(tmp_path, "out") == []


# ---------------------------------------------------------------- manifests: consistency, confinement, hashes


def _edit_manifest(folder: Path, fn) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    fn(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def test_manifest_extra_schedule_entry(capsys, art, tmp_path):
    _edit_manifest(art, lambda m: m["schedule"].append({"layer": 3, "keep": 10, "select": "topk"}))
    rc, _, err = run(capsys, art, red(tmp_path / "ok.png"))
    one_error(rc, err, "manifest.json", "schedule has 3 stages", "2 kept-index")


@pytest.mark.parametrize("field,value", [("n_visual", "144"), ("image_size", [96]), ("visual_start", -1)])
def test_manifest_field_of_the_wrong_type(capsys, art, tmp_path, field, value):
    _edit_manifest(art, lambda m: m["model"].__setitem__(field, value))
    rc, _, err = run(capsys, art, red(tmp_path / "ok.png"))
    one_error(rc, err, "corrupt manifest", f"model.{field}")


def test_deeply_nested_manifest(capsys, art, tmp_path):
    (art / "manifest.json").write_text('{"a": ' + "[" * 100000)
    rc, _, err = run(capsys, art, red(tmp_path / "ok.png"))
    one_error(rc, err, "manifest.json", "nested too deeply")


def _sets_manifest(top: Path, d) -> Path:
    top.mkdir()
    (top / "manifest.json").write_text(json.dumps({"recipe": "tiny", "sets": [{"dir": d, "image_size": [96, 96]}],
                                                   "files": {}}))
    return top


@pytest.mark.parametrize("cmd", ["run", "verify"])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_manifest_set_dir_outside_the_folder(capsys, art, tmp_path, cmd, kind):
    """sets[].dir naming a complete, valid build outside the artifacts folder is refused."""
    top = tmp_path / "top" / "inner"
    top.parent.mkdir()
    d = {"dotdot": "../../art", "absolute": str(art), "symlink": "link"}[kind]
    _sets_manifest(top, d)
    if kind == "symlink":
        os.symlink(art, top / "link")
    extra = ["--image", red(tmp_path / "ok.png"), "--prompt", "what ?"] if cmd == "run" else ["--bench", TEST_SPLIT]
    rc, out, err = cli(capsys, cmd, "--artifacts", top, *extra)
    line = one_error(rc, err, "sets.0.dir")
    assert "outside" in line or "not a path inside" in line or "folder name" in line
    assert out == ""


def test_graph_symlink_leading_out(capsys, art, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(art / "prefill.onnx", outside)
    os.symlink(outside, art / "prefill.onnx")
    rc, _, err = run(capsys, art, red(tmp_path / "ok.png"))
    one_error(rc, err, "prefill.onnx", "leads outside")


@pytest.mark.parametrize("rel", ["../secret.json", "/etc/passwd"])
def test_manifest_files_entry_outside(capsys, art, tmp_path, rel):
    _edit_manifest(art, lambda m: m["files"].__setitem__(rel, {"bytes": 1, "sha256": "0"}))
    rc, _, err = run(capsys, art, red(tmp_path / "ok.png"))
    one_error(rc, err, "manifest.json: files", "not a path inside")


def test_every_file_a_build_writes_is_hashed(good):
    """processor/, recipe.yaml (and external data, calibrated weights when written): everything but
    the graphs (hashed under `graphs`), the manifest and the marker, which lists all of them."""
    out = good[1]
    m = json.loads((out / "manifest.json").read_text())
    every = set(publish.tree_files(out))
    assert set(m["files"]) == every - set(m["graphs"]) - {"manifest.json", publish.MARKER}
    assert any(f.startswith("processor/") for f in m["files"])
    assert set(publish.read_marker(out)["files"]) == every - {publish.MARKER}


def test_edited_processor_config_is_refused(capsys, art, tmp_path):
    """Editing image_mean used to change an answer silently."""
    cfg = next(p for p in (art / "processor").iterdir() if "preprocessor" in p.name or "processor_config" in p.name)
    d = json.loads(cfg.read_text())
    d.setdefault("image_processor", d)["image_mean"] = [0.9, 0.9, 0.9]
    cfg.write_text(json.dumps(d))
    rc, _, err = run(capsys, art, red(tmp_path / "ok.png"))
    one_error(rc, err, str(cfg), "changed after the build")


def test_file_added_to_processor_is_refused(capsys, art, tmp_path):
    added = art / "processor" / "added_tokens.json"  # read by the tokenizer if present
    assert not added.exists()
    added.write_text('{"hijacked": 5}')
    rc, _, err = run(capsys, art, red(tmp_path / "ok.png"))
    one_error(rc, err, str(added), "not written by the build")


def test_manifest_without_file_hashes(capsys, art, tmp_path):
    _edit_manifest(art, lambda m: m.pop("files"))
    rc, _, err = run(capsys, art, red(tmp_path / "ok.png"))
    one_error(rc, err, "no checksums", "rebuild")


# ---------------------------------------------------------------- the one error path


def test_expected_failures_map_to_one_line_and_bugs_do_not():
    from PIL import Image

    from quota_export.failures import expected_failure

    assert "nested too deeply" in expected_failure(RecursionError("maximum recursion depth exceeded"))[0]
    assert expected_failure(FileNotFoundError(2, "No such file or directory", "x.png")) == (
        "x.png: No such file or directory", 2)
    assert expected_failure(Image.DecompressionBombError("Image size (4e8 pixels)"))[0].startswith("image too large")
    assert "UTF-8" in expected_failure(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))[0]
    assert expected_failure(KeyError("kept.3")) is None  # a bug: keeps its traceback
    assert expected_failure(TypeError("x")) is None
    try:  # a SIGTERM that a library turned into its own error while it was loading
        try:
            raise KeyboardInterrupt("terminated")
        except KeyboardInterrupt:
            raise ImportError("initialization failed")  # noqa: B904 (as ORT re-wraps it, context kept)
    except ImportError as e:
        assert expected_failure(e) == ("terminated", 143)
    assert expected_failure(KeyboardInterrupt()) == ("interrupted", 130)


def test_cli_turns_a_stray_oserror_into_one_line(capsys, monkeypatch, tmp_path):
    """An OSError no loader caught (here: report's output folder) is exit 2 and one line."""
    import quota_export.__main__ as m

    def boom(a):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setitem(m.COMMANDS, "run", (m.COMMANDS["run"][0], boom, m.COMMANDS["run"][2]))
    rc, _, err = cli(capsys, "run", "--artifacts", tmp_path, "--image", "x", "--prompt", "p")
    assert rc == 2 and err == f"error: {tmp_path / 'x'}: Permission denied\n"


def test_huge_image_in_eval_names_file_and_line(capsys, tmp_path, tiny_llava):
    bench = jsonl(tmp_path / "b.jsonl", sample(png_header(tmp_path / "big.png", 20000, 20000)))
    rc, _, err = cli(capsys, "eval", "--model", tiny_llava, "--bench", bench, "--method", "fp")
    one_error(rc, err, f"{bench}:1: field 'image'", "not decoded")


def test_journal_naming_other_folders_is_refused(tmp_path):
    """A journal is ours only if it names our own temporary folders: one that points elsewhere
    (here the parent folder) is an error, and nothing is deleted."""
    out = tmp_path / "p" / "out"
    out.parent.mkdir()
    (tmp_path / publish.MARKER).write_text(json.dumps({"build_id": "x", "pid": 1}))
    (out.parent / ".out.quota-journal").write_text(json.dumps({"new": "..", "old": ".out.quota-old-1-x"}))
    with pytest.raises(UserError, match="unreadable journal"):
        publish.claim(out)
    assert (tmp_path / publish.MARKER).exists()


def test_own_files_through_a_symlinked_folder_are_not_ours(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "p.json").write_text("{}")
    d = tmp_path / "build"
    d.mkdir()
    os.symlink(elsewhere, d / "processor")
    marker = {"build_id": "x", "files": {"processor/p.json": publish.file_entry(elsewhere / "p.json")}}
    assert publish.own_files(d, marker) == set()


def test_manifest_edits_that_only_the_graphs_notice(capsys, art, tmp_path):
    """n_visual edited: the prompt check says so; M-RoPE positions added to a LLaVA manifest: ONNX
    Runtime refuses the inputs, as one line naming the graph instead of a traceback."""
    _edit_manifest(art, lambda m: m["model"].__setitem__("n_visual", m["model"]["n_visual"] - 1))
    rc, _, err = run(capsys, art, red(tmp_path / "ok.png"))
    one_error(rc, err, "image tokens", "143")
    _edit_manifest(art, lambda m: m["model"].__setitem__("n_visual", m["model"]["n_visual"] + 1))
    _edit_manifest(art, lambda m: m["model"].__setitem__("mrope", {"visual": [list(range(144))] * 3, "text_after": 12}))
    rc, _, err = run(capsys, art, red(tmp_path / "ok.png"))
    one_error(rc, err, "prefill.onnx", "cannot run it on these inputs", "manifest.json edited")
