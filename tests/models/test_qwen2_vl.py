"""Qwen2-VL end to end on a tiny random checkpoint: M-RoPE positions and rotary tables against HF,
the FP reference against HF's logits and greedy generate, then build -> ONNX Runtime parity.

The tiny model (conftest.make_tiny_qwen2_vl) takes the shapes images at their own 96x96 size:
patch 8, merge 2 -> grid [1,12,12] -> 36 visual tokens.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import yaml
from conftest import S_WEIGHTED, TEST_SPLIT, assert_generate_matches_hf, vision_graph_run

from quota_export import UserError, models
from quota_export.build import build
from quota_export.data import load_bench, load_image
from quota_export.recipe import load_recipe
from quota_export.reference import DeployConfig, Deployed, decode_position

N_VISUAL = 36


@pytest.fixture(scope="module")
def adapter(tiny_qwen2_vl):
    torch.set_num_threads(1)
    return models.load(tiny_qwen2_vl)


def _hf_inputs(adapter, p):
    return dict(input_ids=p.input_ids, pixel_values=p.pixel_values, image_grid_thw=p.extra["image_grid_thw"],
                mm_token_type_ids=(p.input_ids == adapter.image_token_id()).int())


def test_adapter_geometry(adapter, samples):
    assert adapter.architecture == "Qwen2VLForConditionalGeneration"
    assert adapter.image_size() == (96, 96) and adapter.n_visual() == N_VISUAL
    assert adapter.pixel_shape() == (144, 3 * 2 * 8 * 8)
    assert adapter.rope_planes() == [0, 0, 1, 1, 1, 2, 2, 2]  # mrope_section [2, 3, 3]
    p = adapter.prompt(*samples[0])
    assert p.extra["image_grid_thw"].tolist() == [[1, 12, 12]]
    assert p.pixel_values.shape == (144, 384) and p.n_visual == N_VISUAL
    s, T = p.visual_start, p.input_ids.shape[1]
    pos = p.position_ids[:, 0]
    assert p.position_ids.shape == (3, 1, T)
    # text: same position in all planes; visual block: (s, s + row, s + col) on the 6x6 merged grid
    assert torch.equal(pos[:, :s], torch.arange(s).expand(3, s))
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(pos[:, s : s + N_VISUAL], torch.stack([torch.zeros(36, dtype=torch.long), rows.flatten(), cols.flatten()]) + s)
    assert torch.equal(pos[:, s + N_VISUAL :], (torch.arange(T - s - N_VISUAL) + s + 6).expand(3, -1))
    assert p.next_position == int(pos.max()) + 1 == T - N_VISUAL + 6


def test_rope_tables_match_hf(adapter, samples):
    """cos/sin from rope_planes + inv_freq equal HF's Qwen2VLRotaryEmbedding on M-RoPE positions."""
    p = adapter.prompt(*samples[0])
    dep = Deployed(adapter, DeployConfig())
    x = torch.zeros(1, 1, dep.spec.head_dim)
    cos, sin = adapter.lm.rotary_emb(x, p.position_ids)
    f = dep.rope_freqs(p.position_ids)
    emb = torch.cat((f, f), dim=-1)  # float64 with the default fp64 reductions, rounded once to fp32
    torch.testing.assert_close(emb.cos().float(), cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(emb.sin().float(), sin, rtol=0, atol=1e-6)


def test_reference_matches_hf_logits(adapter, samples):
    """FP reference prefill and a decode step at next_position equal HF's forward (incl. M-RoPE)."""
    dep = Deployed(adapter, DeployConfig())
    for img, q in samples:
        p = adapter.prompt(img, q)
        out = dep.prefill(dep.embed_prompt(p), p.positions(), p.visual_start, p.n_visual)
        with torch.no_grad():
            hf = adapter.model(**_hf_inputs(adapter, p))
        torch.testing.assert_close(out.logits, hf.logits[:, -1], rtol=0, atol=1e-4)
        # 1-D positions would give different logits: M-RoPE is really exercised
        flat = dep.prefill(dep.embed_prompt(p), torch.arange(p.input_ids.shape[1])[None], p.visual_start, p.n_visual)
        assert (flat.logits - out.logits).abs().max() > 1e-2
        # one decode step (same position in all 3 planes) == HF over the prompt + that token
        t = int(out.logits.argmax(-1))
        e = adapter.embed_tokens()(torch.tensor([[t]])).float()
        step = dep.decode(e, decode_position(p.next_position, p.positions()), out.cache)
        with torch.no_grad():
            hf2 = adapter.model(**{**_hf_inputs(adapter, p), "input_ids": torch.cat([p.input_ids, torch.tensor([[t]])], 1),
                                   "mm_token_type_ids": torch.cat([_hf_inputs(adapter, p)["mm_token_type_ids"],
                                                                   torch.zeros(1, 1, dtype=torch.int)], 1)})
        torch.testing.assert_close(step, hf2.logits[:, -1], rtol=0, atol=1e-4)


def test_generate_matches_hf(adapter, samples):
    assert_generate_matches_hf(adapter, samples, lambda p: _hf_inputs(adapter, p))


def test_vision_graph_matches_tower(adapter, samples):
    inputs, y, want = vision_graph_run(adapter, samples[1])
    assert inputs == [("pixel_values", [144, 384])]
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5)


QWEN_IGNORE = ["lm_head", r"^model\.visual\."]


def _recipe(path, model, quant, stages, budget, ignore=QWEN_IGNORE):
    q = dict(quant)
    if ignore is not None:
        q["weights"] = {"bits": 4, **q.get("weights", {}), "ignore": ignore}
    doc = {"name": path.stem, "model": str(model), "quant": q,
           "pruning": {"budget": budget, "n_visual": N_VISUAL, "stages": stages}, "export": {"max_new_tokens": 4}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_recipe(path)


def test_default_ignore_does_not_fit_qwen(tiny_qwen2_vl, tmp_path):
    """LLaVA's default ignore regexes (vision_tower, multi_modal_projector) match nothing in Qwen2-VL:
    a Qwen recipe spells out quant.weights.ignore (the weight targets default does match)."""
    from quota_export.build import load_deployed

    r = _recipe(tmp_path / "r.yaml", tiny_qwen2_vl, {"scheme": "w4a16"}, [{"layer": 1, "keep": 18}], 0.9, ignore=None)
    with pytest.raises(UserError, match=r"quant\.weights\.ignore\.1: pattern 'vision_tower' matches no module"):
        load_deployed(r)
    r = _recipe(tmp_path / "r.yaml", tiny_qwen2_vl, {"scheme": "w4a16"}, [{"layer": 1, "keep": 18}], 0.9)
    _, dep = load_deployed(r)
    assert sorted(dep.qweights) == sorted(f"model.language_model.layers.{l}.{x}" for l in range(3) for x in
                                          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def test_build_parity(tiny_qwen2_vl, tmp_path):
    """W4A4KV4, two pruning stages: 8 shapes test images through ONNX Runtime vs the reference."""
    r = _recipe(tmp_path / "qwen-w4a4kv4.yaml", tiny_qwen2_vl, {"scheme": "w4a4kv4"},
                [{"layer": 1, "keep": 18}, {"layer": 2, "keep": 9, **S_WEIGHTED}], 0.6)
    res = build(r, tmp_path / "out", str(TEST_SPLIT), 8, threads=1)
    p = res.manifest["parity"]
    assert p["samples"] == 8
    assert p["kept_index_agreement_per_stage"] == [1.0, 1.0]
    assert p["answer_agreement"] == 1.0
    assert p["logits_sqnr_db_min"] == "inf" or p["logits_sqnr_db_min"] >= 40.0, p
    m = json.loads((res.out / "manifest.json").read_text())
    assert m["model"]["architecture"] == "Qwen2VLForConditionalGeneration"
    assert m["model"]["n_visual"] == N_VISUAL and len(m["model"]["mrope"]["visual"]) == 3
    ins = {g: {i["name"]: i["shape"] for i in m["graphs"][g]["inputs"]} for g in m["graphs"]}
    assert ins["vision.onnx"] == {"pixel_values": [144, 384]}
    assert ins["prefill.onnx"]["position_ids"] == [3, 1, "seq"]
    assert ins["decode.onnx"]["position_ids"] == [3, 1, 1]
    pre = onnx.load(res.out / "prefill.onnx")
    assert any(n.op_type == "Add" and n.name.endswith("q_proj/Bias") for n in pre.graph.node)  # Qwen's q/k/v biases
    # the runner rebuilds the reference's positions from the manifest
    from quota_export.runtime.ort import OrtRunner

    runner = OrtRunner(res.out, threads=1)
    ad = models.load(tiny_qwen2_vl)
    img, q = load_image(load_bench(TEST_SPLIT, limit=1)[0]), "what is here"
    prompt = ad.prompt(img, q)
    ids, pix = runner.encode(img, q)
    assert np.array_equal(ids, prompt.input_ids.numpy())
    assert np.array_equal(runner.positions(ids.shape[1]), prompt.position_ids.numpy())
