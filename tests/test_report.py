"""`report` on a tiny build made here: the files are written and the PNGs are real pictures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("matplotlib", reason="the report figures need matplotlib")

from conftest import ROOT, make_tiny_llava

from quota_export import UserError
from quota_export.__main__ import main
from quota_export.build import build
from quota_export.recipe import load_recipe
from quota_export.report import layers_seen, patch_grid, sqnr_values

STAGES = [{"layer": 1, "keep": 72}, {"layer": 2, "keep": 30}]  # 4 layers: mean (144+72+30+30)/4 = 69 <= 0.5*144


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    model = make_tiny_llava(tmp / "model", seed=3, layers=4, hidden=32)
    doc = {"name": "tiny-report", "model": str(model), "quant": {"scheme": "w4a4kv4"},
           "pruning": {"budget": 0.5, "n_visual": 144, "stages": STAGES}, "export": {"max_new_tokens": 2}}
    (tmp / "r.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp / "graphs"
    build(load_recipe(tmp / "r.yaml"), out, str(ROOT / "calib_data" / "shapes" / "calib.jsonl"), 3, progress=False)
    return out


def _picture(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert arr.shape[0] >= 200 and arr.shape[1] >= 300, f"{path.name}: only {arr.shape[1]}x{arr.shape[0]}"
    assert arr.std() > 0, f"{path.name}: blank"
    # not one background colour with a few specks: a fair share of the pixels carry drawing
    bg = np.median(arr.reshape(-1, 3), axis=0)
    assert (np.abs(arr - bg).sum(-1) > 30).mean() > 0.02, f"{path.name}: almost empty"
    return arr


def test_report_cli_default_image(artifacts, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", "--artifacts", str(artifacts), "--out", str(out)]) == 0
    assert "report.md" in capsys.readouterr().out
    for name in ("schedule.png", "kept_tokens.png", "parity.png"):
        _picture(out / name)
    md = (out / "report.md").read_text()
    for name in ("schedule.png", "kept_tokens.png", "parity.png"):
        assert f"]({name})" in md
    assert "layer 1 keeps 72" in md and "test/00000.png" in md  # the default image: first of test.jsonl
    assert "144, 72, 30, 30" in md


def test_report_default_out_and_own_image(artifacts):
    from quota_export.report import write_report

    img = ROOT / "calib_data" / "shapes" / "images" / "calib" / "00001.png"
    rep = write_report(artifacts, img, prompt="how many objects are there ?")
    assert rep.md == artifacts / "report" / "report.md" and rep.md.is_file()
    assert "how many objects" in rep.md.read_text()
    for p in rep.pngs:
        _picture(p)


def test_report_errors(artifacts, tmp_path, capsys):
    assert main(["report", "--artifacts", str(tmp_path / "nope")]) == 2
    assert "artifacts folder not found" in capsys.readouterr().err
    big = tmp_path / "big.png"
    from PIL import Image

    Image.new("RGB", (64, 80), (200, 10, 10)).save(big)
    assert main(["report", "--artifacts", str(artifacts), "--image", str(big), "--out", str(tmp_path / "o")]) == 2
    assert "these graphs take 96x96" in capsys.readouterr().err


def test_helpers():
    assert patch_grid(144, (96, 96)) == (12, 12, 0)
    assert patch_grid(577, (336, 336)) == (24, 24, 1)  # CLS kept
    assert patch_grid(600, (240, 360)) == (20, 30, 0)
    with pytest.raises(UserError):
        patch_grid(143, (96, 96))
    seen = layers_seen([np.array([0, 1, 2]), np.array([1])], [1, 3], n_visual=5, num_layers=6)
    assert seen.tolist() == [3, 6, 3, 1, 1]
    fin, n_inf, cap = sqnr_values([50.5, "inf", 70.0, "inf"])
    assert fin.tolist() == [50.5, 70.0] and n_inf == 2 and cap == 80.0 and not math.isinf(cap)


@pytest.mark.slow
def test_report_python_dash_m(artifacts, tmp_path):
    """The command is registered when run the way users run it (a separate `quota_export.__main__` copy would not see it)."""
    import subprocess
    import sys

    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "quota_export", "report", "--artifacts", str(artifacts), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    assert (out / "report.md").is_file()


def test_report_replaces_only_its_own_files(artifacts, tmp_path, capsys):
    """A second report into the same folder replaces the first one's files; a file of the same
    name that `report` did not write, or that was changed since, is one error line, exit 2, and
    nothing in the folder changes."""
    out = tmp_path / "rep"
    assert main(["report", "--artifacts", str(artifacts), "--out", str(out)]) == 0
    assert main(["report", "--artifacts", str(artifacts), "--out", str(out), "--prompt", "what is it ?"]) == 0
    assert "what is it ?" in (out / "report.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == [".quota_export-report", "kept_tokens.png", "parity.png",
                                                     "report.md", "schedule.png"]
    capsys.readouterr()
    (out / "report.md").write_text("my notes\n")  # the user edits the report
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["report", "--artifacts", str(artifacts), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "report.md: exists and was not written by `report`" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "schedule.png").write_bytes(b"not ours")
    assert main(["report", "--artifacts", str(artifacts), "--out", str(mine)]) == 2
    assert "schedule.png: exists and was not written" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["schedule.png"] and (mine / "schedule.png").read_bytes() == b"not ours"
