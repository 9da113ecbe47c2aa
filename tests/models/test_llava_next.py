"""LLaVA-NeXT (LLaVA-1.6) end to end on a tiny random checkpoint: the FP reference against HF's
logits and greedy generate, the vision graph (any-resolution crops -> packed features with the
newline embeddings) against HF's tower, then build -> ONNX Runtime parity.

The tiny model (conftest.make_tiny_llava_next) declares 96x96 (its one grid pinpoint), crop 48,
patch 8: pixel_values [1,5,3,48,48] -> 36 base + 12*12 grid + 12 newline = 192 visual tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import S_WEIGHTED, TEST_SPLIT, assert_generate_matches_hf, make_tiny_llava_next, vision_graph_run

from quota_export import UserError, models
from quota_export.build import build
from quota_export.data import load_bench, load_image
from quota_export.recipe import load_recipe
from quota_export.reference import DeployConfig, Deployed

N_VISUAL = 192


@pytest.fixture(scope="module")
def adapter(tiny_llava_next):
    torch.set_num_threads(1)
    return models.load(tiny_llava_next)


def _hf_inputs(p):
    return dict(input_ids=p.input_ids, pixel_values=p.pixel_values, image_sizes=p.extra["image_sizes"])


def test_adapter_geometry(adapter, samples):
    assert adapter.architecture == "LlavaNextForConditionalGeneration"
    assert adapter.image_size() == (96, 96) and adapter.n_visual() == N_VISUAL
    assert adapter.pixel_shape() == (1, 5, 3, 48, 48)
    assert adapter.rope_planes() is None
    p = adapter.prompt(*samples[0])
    assert p.pixel_values.shape == (1, 5, 3, 48, 48) and p.extra["image_sizes"].tolist() == [[96, 96]]
    assert p.n_visual == N_VISUAL and p.position_ids is None
    # the count rule agrees with the processor's own (_get_number_of_features counts the CLS once)
    proc = adapter.processor
    assert proc._get_number_of_features(96, 96, 48, 48) - 1 == N_VISUAL
    # and with HF's packing: the newline embedding closes each of the 12 rows of the 12x12 grid map
    f = adapter.vision_features(p.pixel_values)[0]
    assert f.shape == (N_VISUAL, 64)
    nl = adapter.model.model.image_newline.float()
    rows = f[36:].reshape(12, 13, 64)
    assert torch.equal(rows[:, 12], nl.expand(12, 64))
    with pytest.raises(UserError, match=r"image is 64x96, the model takes 96x96"):
        adapter.prompt(np.zeros((96, 64, 3), np.uint8), "what is here")


def test_one_declared_size(tmp_path):
    """A processor with several grid pinpoints (the checkpoint default) has no single declared size."""
    out = make_tiny_llava_next(tmp_path / "m")
    cfg_file = out / "processor_config.json"
    cfg = json.loads(cfg_file.read_text())
    ip = cfg.get("image_processor", cfg)
    ip["image_grid_pinpoints"] = [[96, 96], [48, 96]]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"needs one declared image size: set image_grid_pinpoints to exactly one"):
        models.load(out)


def test_reference_matches_hf_logits(adapter, samples):
    dep = Deployed(adapter, DeployConfig())
    for img, q in samples:
        p = adapter.prompt(img, q)
        out = dep.prefill(dep.embed_prompt(p), p.positions(), p.visual_start, p.n_visual)
        with torch.no_grad():
            hf = adapter.model(**_hf_inputs(p))
        torch.testing.assert_close(out.logits, hf.logits[:, -1], rtol=0, atol=1e-4)


def test_generate_matches_hf(adapter, samples):
    assert_generate_matches_hf(adapter, samples, _hf_inputs)


def test_vision_graph_matches_tower(adapter, samples):
    inputs, y, want = vision_graph_run(adapter, samples[1])
    assert inputs == [("pixel_values", [1, 5, 3, 48, 48])]
    assert y.shape == (1, N_VISUAL, 64)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-4)


def test_build_parity(tiny_llava_next, tmp_path):
    """W4A4KV4, two pruning stages (192 -> 96 -> 48): 8 shapes test images through ONNX Runtime vs the
    reference. LLaVA's default quant.weights.ignore (vision_tower, multi_modal_projector) fits."""
    doc = {"name": "llava-next-w4a4kv4", "model": str(tiny_llava_next), "quant": {"scheme": "w4a4kv4"},
           "pruning": {"budget": 0.6, "n_visual": N_VISUAL,
                       "stages": [{"layer": 1, "keep": 96}, {"layer": 2, "keep": 48, **S_WEIGHTED}]},
           "export": {"max_new_tokens": 4}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    res = build(load_recipe(tmp_path / "r.yaml"), tmp_path / "out", str(TEST_SPLIT), 8, threads=1)
    p = res.manifest["parity"]
    assert p["samples"] == 8
    assert p["kept_index_agreement_per_stage"] == [1.0, 1.0]
    assert p["answer_agreement"] == 1.0
    assert p["logits_sqnr_db_min"] == "inf" or p["logits_sqnr_db_min"] >= 40.0, p
    m = json.loads((res.out / "manifest.json").read_text())
    assert m["model"]["architecture"] == "LlavaNextForConditionalGeneration"
    assert m["model"]["n_visual"] == N_VISUAL and "mrope" not in m["model"]
    ins = {g: {i["name"]: i["shape"] for i in m["graphs"][g]["inputs"]} for g in m["graphs"]}
    assert ins["vision.onnx"] == {"pixel_values": [1, 5, 3, 48, 48]}
    assert ins["prefill.onnx"]["position_ids"] == [1, "seq"]
    # the runner encodes through the shipped processor exactly as the reference does
    from quota_export.runtime.ort import OrtRunner

    runner = OrtRunner(res.out, threads=1)
    ad = models.load(tiny_llava_next)
    img, q = load_image(load_bench(TEST_SPLIT, limit=1)[0]), "what is here"
    prompt = ad.prompt(img, q)
    ids, pix = runner.encode(img, q)
    assert np.array_equal(ids, prompt.input_ids.numpy())
    assert np.array_equal(pix, prompt.pixel_values.numpy())


def test_non_square_declared_size(tmp_path):
    """A non-square pinpoint (96 tall x 48 wide: 2x1 grid crops): the count rule, the processor's count
    and the exported packing (rows of 6 features + newline) agree with HF's get_image_features."""
    ad = models.load(make_tiny_llava_next(tmp_path / "m", pinpoint=(96, 48)))
    n = 36 + 12 * (6 + 1)
    assert ad.image_size() == (96, 48) and ad.n_visual() == n and ad.pixel_shape() == (1, 3, 3, 48, 48)
    assert ad.processor._get_number_of_features(96, 48, 48, 48) - 1 == n
    img = np.random.default_rng(0).integers(0, 256, (96, 48, 3), dtype=np.uint8)
    p = ad.prompt(img, "what is here")
    assert p.n_visual == n
    with torch.no_grad():
        y = ad.vision_module()(p.pixel_values)
    torch.testing.assert_close(y, ad.vision_features(p.pixel_values), rtol=0, atol=1e-5)
    with torch.no_grad():  # the reference's features are HF's own (image_sizes from the processor)
        hf = ad.model.model.get_image_features(p.pixel_values, p.extra["image_sizes"]).pooler_output[0]
    torch.testing.assert_close(y[0], hf.float(), rtol=0, atol=1e-5)
