"""Dynamic resolution: the schedule as fractions per stage, one graph set per declared image size.

A recipe's stages carry `fraction` (keep / n_visual, written by calibrate); `export.image_sizes`
lists the sizes to build; `build` writes <out>/<W>x<H>/ per size (k per stage from the fractions)
and a top-level manifest listing them; `run` picks the set by the image's size and refuses others;
`verify` checks every set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import ROOT, TEST_SPLIT, make_tiny_llava, make_tiny_llava_next, make_tiny_qwen2_vl
from PIL import Image

from quota_export import UserError, models
from quota_export.__main__ import main
from quota_export.recipe import Pruning, Stage

CALIB_SPLIT = ROOT / "calib_data" / "shapes" / "calib.jsonl"


# ---------------------------------------------------------------- fractions


def test_keeps_for_scales_fractions_and_keeps_exact_counts():
    p = Pruning(budget=0.3, n_visual=144, stages=[Stage(layer=0, keep=114), Stage(layer=1, keep=39),
                                                  Stage(layer=4, keep=13, fraction=0.0902778)])  # fmt: skip
    assert p.keeps_for(144) == [114, 39, 13]  # the calibrated size: the counts themselves
    assert p.keeps_for(36) == [29, 10, 3]  # round(f * 36), half up
    assert p.keeps_for(1752) == [1387, 474, 158]
    assert p.keeps_for(2) == [2, 1, 1]  # at least one token, never more than the stage before


def test_fraction_must_agree_with_keep_and_not_grow():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="fraction 0.5 of n_visual 144 is 72 tokens, not keep 39"):
        Pruning(budget=0.3, n_visual=144, stages=[Stage(layer=1, keep=39, fraction=0.5)])
    with pytest.raises(ValidationError, match="must be non-increasing"):
        Pruning(budget=1.0, n_visual=100, stages=[Stage(layer=1, keep=40, fraction=0.4),
                                                  Stage(layer=2, keep=40, fraction=0.404)])  # fmt: skip


# ---------------------------------------------------------------- adapters


def test_fixed_size_family_refuses_other_sizes(tmp_path):
    a = models.load(make_tiny_llava(tmp_path / "m"))
    assert a.with_image_size(96, 96) is a
    with pytest.raises(UserError, match=r"export.image_sizes: LlavaForConditionalGeneration takes one image size, 96x96"):
        a.with_image_size(96, 128)


def test_llava_next_sizes_must_be_pinpoints(tmp_path):
    a = models.load(make_tiny_llava_next(tmp_path / "m"))
    with pytest.raises(UserError, match=r"\[96, 144\] must be multiples of the crop size 48 and listed"):
        a.with_image_size(96, 144)


def test_qwen_sizes_must_be_multiples_of_the_merged_patch(tmp_path):
    a = models.load(make_tiny_qwen2_vl(tmp_path / "m"))
    with pytest.raises(UserError, match="multiples of patch_size \\* merge_size = 16"):
        a.with_image_size(96, 100)
    b = a.with_image_size(96, 128)
    assert b.image_size() == (96, 128) and b.n_visual() == 48 and a.image_size() == (96, 96)
    p = b.prompt(np.zeros((96, 128, 3), np.uint8), "describe image")
    assert p.n_visual == 48 and b.vision_features(p.pixel_values).shape[1] == 48


# ---------------------------------------------------------------- calibrate -> build -> run / verify


@pytest.fixture(scope="module")
def multi_build(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("sizes")
    model = make_tiny_qwen2_vl(tmp / "model")
    recipe = tmp / "r.yaml"
    assert main(["calibrate", "--model", str(model), "--data", str(CALIB_SPLIT), "--budget", "0.5",
                 "--samples", "4", "-o", str(recipe)]) == 0  # fmt: skip
    r = yaml.safe_load(recipe.read_text())
    r["export"]["image_sizes"] = [[96, 96], [96, 128]]
    r["export"]["max_new_tokens"] = 3
    recipe.write_text(yaml.safe_dump(r, sort_keys=False))
    out = tmp / "graphs"
    assert main(["build", "--recipe", str(recipe), "--out", str(out), "--bench", str(TEST_SPLIT), "--samples", "3"]) == 0
    return tmp, r, out


@pytest.mark.slow
def test_calibrate_writes_fractions(multi_build):
    _, r, _ = multi_build
    p = r["pruning"]
    assert p["stages"] and all(abs(s["fraction"] * p["n_visual"] - s["keep"]) < 1e-3 for s in p["stages"])


def test_one_graph_set_per_size(multi_build):
    _, r, out = multi_build
    top = json.loads((out / "manifest.json").read_text())
    assert [s["dir"] for s in top["sets"]] == ["96x96", "128x96"]
    assert [s["n_visual"] for s in top["sets"]] == [36, 48]
    fr = [s["fraction"] for s in r["pruning"]["stages"]]
    for st in top["sets"]:
        sub = json.loads((out / st["dir"] / "manifest.json").read_text())
        assert sub["model"]["image_size"] == st["image_size"]
        assert [s["keep"] for s in sub["schedule"]] == [max(1, int(f * st["n_visual"] + 0.5)) for f in fr]
        assert st["parity"]["kept_index_agreement"] == 1.0 and st["parity"]["answer_agreement"] == 1.0
        assert {"vision.onnx", "embed.onnx", "prefill.onnx", "decode.onnx", "recipe.yaml"} <= {p.name for p in (out / st["dir"]).iterdir()}


def test_run_picks_the_set_by_image_size_and_refuses_others(multi_build, capsys):
    tmp, _, out = multi_build
    src = Image.open(ROOT / "calib_data" / "shapes" / "images" / "test" / "00000.png").convert("RGB")
    for w, h, rc in ((96, 96, 0), (128, 96, 0), (112, 112, 2)):
        img = tmp / f"img{w}x{h}.png"
        src.resize((w, h)).save(img)
        capsys.readouterr()
        assert main(["run", "--artifacts", str(out), "--image", str(img), "--prompt", "is there a red circle ?"]) == rc
    err = capsys.readouterr().err.strip()
    assert err == f"error: image is 112x112: {out} has graphs for 96x96, 128x96 only (export.image_sizes)"


def test_verify_checks_every_set(multi_build):
    tmp, _, out = multi_build
    assert main(["verify", "--artifacts", str(out), "--bench", str(TEST_SPLIT), "--samples", "3",
                 "--json", str(tmp / "v.json")]) == 0  # fmt: skip
    v = json.loads((tmp / "v.json").read_text())
    assert set(v["sets"]) == {"96x96", "128x96"} and v["samples"] == 6
    assert v["kept_index_agreement"] == 1.0 and v["answer_agreement"] == 1.0
    assert v["logits_sqnr_db_min"] == "inf" or v["logits_sqnr_db_min"] >= 40.0


def test_a_set_folder_is_a_build_of_its_own(multi_build, capsys):
    _, _, out = multi_build
    assert main(["run", "--artifacts", str(out / "128x96"), "--image",
                 str(ROOT / "calib_data" / "shapes" / "images" / "test" / "00000.png"), "--prompt", "x"]) == 2  # fmt: skip
    assert "these graphs take 128x96" in capsys.readouterr().err


def test_llava_next_builds_one_set_per_pinpoint(tmp_path):
    """LLaVA-NeXT: config.json lists two pinpoints; a hand-written recipe with fractions builds both."""
    import torch

    torch.set_num_threads(1)
    model = make_tiny_llava_next(tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["image_grid_pinpoints"] = [[96, 96], [96, 144]]
    (model / "config.json").write_text(json.dumps(cfg))
    recipe = {
        "name": "next-sizes", "model": str(model), "quant": {"scheme": "w4a4kv4"},
        "pruning": {"budget": 0.6, "n_visual": 192, "stages": [{"layer": 1, "keep": 96, "fraction": 0.5},
                                                                {"layer": 2, "keep": 48, "fraction": 0.25}]},
        "export": {"image_sizes": [[96, 96], [96, 144]], "max_new_tokens": 2, "max_seq": 512},
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "g"
    assert main(["build", "--recipe", str(tmp_path / "r.yaml"), "--out", str(out), "--bench", str(TEST_SPLIT),
                 "--samples", "2"]) == 0  # fmt: skip
    top = json.loads((out / "manifest.json").read_text())
    assert [(s["dir"], s["n_visual"]) for s in top["sets"]] == [("96x96", 192), ("144x96", 264)]
    assert [[st["keep"] for st in s["schedule"]] for s in top["sets"]] == [[96, 48], [132, 66]]
    assert all(s["parity"]["kept_index_agreement"] == 1.0 for s in top["sets"])
