"""Bad input to build / verify / run: one `error: ...` line naming the field or file, exit code 2,
and nothing (half-)written where the output folder would go.

The CLI runs in-process through `quota_export.__main__.main`; one case runs it as a subprocess to
check that nothing else (library warnings, progress bars, tracebacks) reaches the terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TEST_SPLIT

from quota_export.__main__ import main

STAGES = [{"layer": 1, "keep": 72}, {"layer": 2, "keep": 30}]


def recipe(path: Path, model: Path, **over) -> Path:
    doc = {"name": "tiny", "model": str(model), "quant": {"scheme": "w4a4kv4"},
           "pruning": {"budget": 0.5, "n_visual": 144, "stages": STAGES}, "export": {"max_new_tokens": 2}}
    for k, v in over.items():
        doc[k] = v
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error(rc: int, err: str, *needles: str, code: int = 2) -> str:
    """Exactly one `error:` line, last, naming what is wrong; anything before it is a build step line."""
    lines = err.splitlines()
    assert rc == code, err
    assert lines and lines[-1].startswith("error: "), err
    assert all(ln.startswith("[") or ln.startswith("      ") for ln in lines[:-1]), err
    for n in needles:
        assert n in lines[-1], lines[-1]
    return lines[-1]


def nothing_written(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")] == []


def build_fails(capsys, tmp_path, rpath, *needles, code=2) -> str:
    """Build into tmp_path/sub/out: an error, and neither out nor sub/ (created for it) is left."""
    rc, out, err = cli(capsys, "build", "--recipe", rpath, "--out", tmp_path / "sub" / "out",
                       "--bench", TEST_SPLIT, "--samples", 2)
    line = one_error(rc, err, *needles, code=code)
    assert out == ""
    assert not (tmp_path / "sub").exists()
    return line


@pytest.fixture(scope="module")
def good_build(tiny_llava, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good")
    r = recipe(d / "r.yaml", tiny_llava)
    assert main(["build", "--recipe", str(r), "--out", str(d / "out"), "--bench", str(TEST_SPLIT), "--samples", "2"]) == 0
    return d / "out"


@pytest.fixture
def artifacts(good_build, tmp_path) -> Path:
    """A private copy of the good build, to damage."""
    return Path(shutil.copytree(good_build, tmp_path / "art"))


@pytest.fixture
def model_copy(tiny_llava, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llava, tmp_path / "model"))


def image(tmp_path: Path, w: int, h: int) -> Path:
    from PIL import Image

    p = tmp_path / f"img{w}x{h}.png"
    Image.new("RGB", (w, h), (200, 30, 30)).save(p)
    return p


# ---------------------------------------------------------------- recipe vs model


def test_recipe_for_another_model_n_visual(capsys, tmp_path, tiny_llava):
    r = recipe(tmp_path / "r.yaml", tiny_llava, pruning={"budget": 0.5, "n_visual": 576, "stages": STAGES})
    build_fails(capsys, tmp_path, r, "pruning.n_visual", "576", "144")


def test_recipe_for_another_model_layers(capsys, tmp_path, tiny_llava):
    r = recipe(tmp_path / "r.yaml", tiny_llava,
               pruning={"budget": 0.5, "n_visual": 144, "stages": [{"layer": 1, "keep": 72}, {"layer": 20, "keep": 30}]})
    build_fails(capsys, tmp_path, r, "pruning.stages.1.layer", "layer 20", "layers 4")


def test_recipe_regex_matches_nothing(capsys, tmp_path, tiny_llava):
    ignore = ["lm_head", "vision_tower", "multi_modal_projector", r"^model\.visual\."]  # Qwen2-VL's name
    r = recipe(tmp_path / "r.yaml", tiny_llava, quant={"scheme": "w4a4kv4", "weights": {"bits": 4, "ignore": ignore}})
    build_fails(capsys, tmp_path, r, "quant.weights.ignore.3", "matches no module")


def test_recipe_group_size_does_not_fit(capsys, tmp_path, tiny_llava):
    r = recipe(tmp_path / "r.yaml", tiny_llava, quant={"scheme": "w4a4kv4", "kv_cache": {"bits": 4, "group_size": 6}})
    build_fails(capsys, tmp_path, r, "quant.kv_cache.group_size", "head_dim 16")


def test_malformed_recipe_unknown_key(capsys, tmp_path, tiny_llava):
    r = recipe(tmp_path / "r.yaml", tiny_llava, export={"max_new_tokens": 2, "max_new_token": 3})
    build_fails(capsys, tmp_path, r, str(r), "export.max_new_token")


# ---------------------------------------------------------------- the checkpoint


def test_missing_model_folder(capsys, tmp_path):
    r = recipe(tmp_path / "r.yaml", tmp_path / "no-such-model")
    build_fails(capsys, tmp_path, r, "model:", "no-such-model", "not found")


def test_truncated_safetensors(capsys, tmp_path, model_copy):
    w = model_copy / "model.safetensors"
    with open(w, "r+b") as f:
        f.truncate(w.stat().st_size // 2)
    build_fails(capsys, tmp_path, recipe(tmp_path / "r.yaml", model_copy), str(w), "corrupt or truncated")


def test_garbage_config_json(capsys, tmp_path, model_copy):
    (model_copy / "config.json").write_text('{"architectures": ["Llava')
    build_fails(capsys, tmp_path, recipe(tmp_path / "r.yaml", model_copy), str(model_copy / "config.json"), "corrupt")


def test_config_that_does_not_fit_the_weights(capsys, tmp_path, model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 128
    (model_copy / "config.json").write_text(json.dumps(cfg))
    build_fails(capsys, tmp_path, recipe(tmp_path / "r.yaml", model_copy), "model.safetensors", "do not fit config.json")


def test_unknown_architecture(capsys, tmp_path, model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["FooForBar"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    line = build_fails(capsys, tmp_path, recipe(tmp_path / "r.yaml", model_copy), "config.json", "FooForBar")
    assert "LlavaForConditionalGeneration" in line  # says what is supported


@pytest.mark.slow
def test_cli_subprocess_prints_only_steps_and_the_error(tmp_path, model_copy):
    """The real terminal: no warnings, progress bars or traceback around the error line."""
    w = model_copy / "model.safetensors"
    with open(w, "r+b") as f:
        f.truncate(100)
    r = recipe(tmp_path / "r.yaml", model_copy)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "quota_export", "build", "--recipe", str(r), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [f"[1/5] loading {model_copy}", p.stderr.splitlines()[-1]], p.stderr
    assert p.stderr.splitlines()[-1].startswith(f"error: {w}: corrupt or truncated weights")
    nothing_written(tmp_path)


# ---------------------------------------------------------------- the output folder


def test_output_path_is_a_file(capsys, tmp_path, tiny_llava):
    (tmp_path / "out").write_text("not a folder")
    rc, _, err = cli(capsys, "build", "--recipe", recipe(tmp_path / "r.yaml", tiny_llava), "--out", tmp_path / "out")
    one_error(rc, err, str(tmp_path / "out"), "is a file")
    assert err.count("\n") == 1  # refused before any work
    assert (tmp_path / "out").read_text() == "not a folder"


def test_output_folder_that_is_not_a_build_is_not_replaced(capsys, tmp_path, tiny_llava):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    rc, _, err = cli(capsys, "build", "--recipe", recipe(tmp_path / "r.yaml", tiny_llava), "--out", tmp_path / "out")
    one_error(rc, err, "not a previous build")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_parity_failure_writes_nothing(capsys, tmp_path, tiny_llava, good_build, monkeypatch):
    """A build whose graphs miss the parity thresholds leaves no folder, and an older build at the
    same place untouched; exit 1 (the graphs are wrong, not the input), as `verify` does."""
    from quota_export import verify

    monkeypatch.setitem(verify.THRESHOLDS, "logits_sqnr_db_min", 1e9)
    r = recipe(tmp_path / "r.yaml", tiny_llava)
    line = build_fails(capsys, tmp_path, r, "parity check failed", "logits SQNR", code=1)
    assert "nothing written" in line
    old = Path(shutil.copytree(good_build, tmp_path / "old"))
    before = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}
    rc, _, err = cli(capsys, "build", "--recipe", r, "--out", old, "--bench", TEST_SPLIT, "--samples", 2)
    one_error(rc, err, "parity check failed", code=1)
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == before
    nothing_written(tmp_path, "old.")  # no .old.XXXX temporary folder


# ---------------------------------------------------------------- verify / run on damaged artifacts


def test_verify_truncated_prefill(capsys, artifacts):
    g = artifacts / "prefill.onnx"
    with open(g, "r+b") as f:
        f.truncate(g.stat().st_size // 3)
    rc, _, err = cli(capsys, "verify", "--artifacts", artifacts, "--bench", TEST_SPLIT, "--samples", 1)
    one_error(rc, err, str(g), "corrupt graph", "truncated")


def test_run_garbage_graph_ort_cannot_load(capsys, artifacts, tmp_path):
    """A graph that matches its manifest entry but is not ONNX: onnxruntime's own error, on one line."""
    import hashlib

    g = artifacts / "embed.onnx"
    g.write_bytes(b"\x08\x07garbage" * 100)
    man = json.loads((artifacts / "manifest.json").read_text())
    man["graphs"]["embed.onnx"].update(bytes=g.stat().st_size, sha256=hashlib.sha256(g.read_bytes()).hexdigest())
    (artifacts / "manifest.json").write_text(json.dumps(man))
    rc, _, err = cli(capsys, "run", "--artifacts", artifacts, "--image", image(tmp_path, 96, 96), "--prompt", "what ?")
    one_error(rc, err, str(g), "corrupt or unreadable graph")


def test_run_missing_decode(capsys, artifacts, tmp_path):
    (artifacts / "decode.onnx").unlink()
    rc, _, err = cli(capsys, "run", "--artifacts", artifacts, "--image", image(tmp_path, 96, 96), "--prompt", "what ?")
    one_error(rc, err, str(artifacts / "decode.onnx"), "missing")


@pytest.mark.parametrize("cmd", ["run", "verify"])
def test_missing_manifest(capsys, artifacts, tmp_path, cmd):
    (artifacts / "manifest.json").unlink()
    extra = ["--image", image(tmp_path, 96, 96), "--prompt", "what ?"] if cmd == "run" else ["--bench", TEST_SPLIT]
    rc, _, err = cli(capsys, cmd, "--artifacts", artifacts, *extra)
    one_error(rc, err, str(artifacts / "manifest.json"), "missing")


def test_corrupt_manifest(capsys, artifacts, tmp_path):
    (artifacts / "manifest.json").write_text('{"recipe": "tiny", "graphs": {}}')
    rc, _, err = cli(capsys, "run", "--artifacts", artifacts, "--image", image(tmp_path, 96, 96), "--prompt", "what ?")
    one_error(rc, err, "manifest.json", "corrupt manifest")


def test_verify_edited_recipe(capsys, artifacts):
    r = artifacts / "recipe.yaml"
    r.write_text(r.read_text().replace("max_new_tokens: 2", "max_new_tokens: 3"))
    rc, _, err = cli(capsys, "verify", "--artifacts", artifacts, "--bench", TEST_SPLIT, "--samples", 1)
    one_error(rc, err, str(r), "changed after the build")  # manifest `files` checksums


def test_run_image_of_another_size(capsys, artifacts, tmp_path):
    """LLaVA-1.5 (one fixed input size) resizes any image as its processor does (test_realsize.py);
    the dynamic-resolution families refuse sizes not built for (test_image_sizes.py)."""
    img = image(tmp_path, 64, 48)
    rc, out, err = cli(capsys, "run", "--artifacts", artifacts, "--image", img, "--prompt", "what ?")
    assert rc == 0, err


def test_verify_and_run_on_the_good_build(capsys, good_build, tmp_path):
    """The untouched build passes verify (exit 0, JSON report) and answers through run."""
    rc, out, err = cli(capsys, "verify", "--artifacts", good_build, "--bench", TEST_SPLIT, "--samples", 2,
                       "--json", tmp_path / "rep.json")
    assert rc == 0, err
    assert out.startswith("parity over 2 samples of test.jsonl: kept-index agreement 100.0%")
    assert json.loads((tmp_path / "rep.json").read_text())["answer_agreement"] == 1.0
