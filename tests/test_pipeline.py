"""calibrate -> build -> verify for every registered family, on tiny random checkpoints.

Each family's own test module checks its adapter against HF; this one runs the whole user
pipeline through the CLI: QUOTA calibration writes a recipe, `build` lowers and checks it,
`verify` re-checks the published graphs on other samples of the test split."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import ROOT, TEST_SPLIT, make_tiny_llava, make_tiny_llava_next, make_tiny_qwen2_vl

from quota_export import models
from quota_export.__main__ import main

pytestmark = pytest.mark.slow  # calibrate -> build -> verify for every family (~50 s)

CALIB_SPLIT = ROOT / "calib_data" / "shapes" / "calib.jsonl"

FAMILIES = {
    "LlavaForConditionalGeneration": lambda p: make_tiny_llava(p, seed=5),
    "LlavaNextForConditionalGeneration": lambda p: make_tiny_llava_next(p),
    "Qwen2VLForConditionalGeneration": lambda p: make_tiny_qwen2_vl(p),
    "Qwen2_5_VLForConditionalGeneration": lambda p: make_tiny_qwen2_vl(p, seed=2, arch="Qwen2_5_VLForConditionalGeneration"),
}


def test_pipeline_covers_every_family():
    assert set(FAMILIES) == set(models.REGISTRY)


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_calibrate_build_verify(arch, tmp_path, capsys):
    import torch

    torch.set_num_threads(1)
    model = FAMILIES[arch](tmp_path / "model")
    recipe = tmp_path / "r.yaml"
    rc = main(["calibrate", "--model", str(model), "--data", str(CALIB_SPLIT), "--budget", "0.5",
               "--samples", "4", "-o", str(recipe)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    r = yaml.safe_load(recipe.read_text())
    assert r["pruning"]["stages"] and r["calibration"]["method"] == "quota"
    r["export"]["max_new_tokens"] = 3
    recipe.write_text(yaml.safe_dump(r, sort_keys=False))
    out = tmp_path / "graphs"
    rc = main(["build", "--recipe", str(recipe), "--out", str(out), "--bench", str(TEST_SPLIT), "--samples", "4"])
    assert rc == 0, capsys.readouterr().err
    rc = main(["verify", "--artifacts", str(out), "--bench", str(TEST_SPLIT), "--samples", "8",
               "--json", str(tmp_path / "v.json")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["samples"] == 8
    assert v["kept_index_agreement"] == 1.0 and v["answer_agreement"] == 1.0
    assert v["logits_sqnr_db_min"] == "inf" or v["logits_sqnr_db_min"] >= 40.0
