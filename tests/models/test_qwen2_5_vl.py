"""Qwen2.5-VL on a tiny random checkpoint: the Qwen2-VL adapter's decoder, M-RoPE positions and
merged features, with Qwen2.5's windowed vision tower (2 blocks: one windowed, one full).
The FP reference equals HF's logits; build -> ONNX Runtime parity on 8 shapes test images."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_qwen2_vl
from test_qwen2_vl import N_VISUAL, S_WEIGHTED, TEST_SPLIT, _hf_inputs, _recipe

from quota_export import models
from quota_export.build import build
from quota_export.reference import DeployConfig, Deployed


@pytest.fixture(scope="module")
def tiny_qwen2_5_vl(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl") / "model", seed=2,
                              arch="Qwen2_5_VLForConditionalGeneration")


def test_reference_matches_hf_logits(tiny_qwen2_5_vl):
    from quota_export.data import load_bench, load_image

    ad = models.load(tiny_qwen2_5_vl)
    assert ad.architecture == "Qwen2_5_VLForConditionalGeneration" and ad.n_visual() == N_VISUAL
    dep = Deployed(ad, DeployConfig())
    for s in load_bench(TEST_SPLIT, limit=2):
        p = ad.prompt(load_image(s), s.question)
        out = dep.prefill(dep.embed_prompt(p), p.positions(), p.visual_start, p.n_visual)
        with torch.no_grad():
            hf = ad.model(**_hf_inputs(ad, p))
        torch.testing.assert_close(out.logits, hf.logits[:, -1], rtol=0, atol=1e-4)


def test_build_parity(tiny_qwen2_5_vl, tmp_path):
    r = _recipe(tmp_path / "qwen25-w4a4kv8.yaml", tiny_qwen2_5_vl, {"scheme": "w4a4kv8"},
                [{"layer": 1, "keep": 20, **S_WEIGHTED}], 0.75)
    res = build(r, tmp_path / "out", str(TEST_SPLIT), 8, threads=1)
    p = res.manifest["parity"]
    assert p["kept_index_agreement_per_stage"] == [1.0] and p["answer_agreement"] == 1.0
    assert p["logits_sqnr_db_min"] == "inf" or p["logits_sqnr_db_min"] >= 40.0, p
    assert res.manifest["model"]["mrope"]["text_after"] == 6
