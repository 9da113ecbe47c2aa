"""quant.activations.rotation: hadamard on whole models: the rotation keeps the FP function, a
rotated, pruned, merged recipe builds and verifies exactly (the online Hadamard primitive itself is
checked in tests/ops/test_rotate.py), and a model it cannot rotate gets one error line."""

from __future__ import annotations

import collections
import dataclasses

import onnx
import pytest
import torch
import yaml
from conftest import S_WEIGHTED, TEST_SPLIT

from quota_export import UserError, models
from quota_export.recipe import FP, load_recipe
from quota_export.reference import DeployConfig, Deployed


@pytest.fixture(scope="module")
def tiny_normed(tmp_path_factory):
    """tiny LLaVA (hidden 64, intermediate 160 = 8 x Paley 20) whose RMSNorm weights are not ones
    (HF initialises them to 1, which would hide where the norm weight is applied)."""
    from conftest import make_tiny_llava
    from transformers import LlavaForConditionalGeneration

    path = make_tiny_llava(tmp_path_factory.mktemp("tiny_normed") / "model", seed=5)
    model = LlavaForConditionalGeneration.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and "norm" in name:
                p.copy_(torch.exp(0.7 * torch.randn(p.shape, generator=g)))
    model.save_pretrained(path, safe_serialization=True)
    return path


def _rotated_fp() -> DeployConfig:
    q = FP.model_copy(deep=True)
    q.activations.rotation = "hadamard"
    return DeployConfig(quant=q)


def test_rotation_keeps_the_fp_function(tiny_normed):
    """Unquantized, the rotated model (hidden 64 = Sylvester with random signs, intermediate
    160 = 8 x Paley 20) computes the checkpoint's logits up to float rounding, the same greedy
    tokens, and its decoder reads weights that are really rotated (norm weights folded: ones)."""
    from quota_export.data import load_bench, load_image

    ad = models.load(tiny_normed)
    plain, rot = Deployed(ad, DeployConfig()), Deployed(ad, _rotated_fp())
    assert all(torch.equal(w, torch.ones_like(w)) for w in rot.ln1 + rot.ln2 + [rot.norm])
    assert not torch.allclose(rot.W[0]["mlp.down_proj"], plain.W[0]["mlp.down_proj"], atol=1e-3)
    for s in load_bench(TEST_SPLIT, limit=3):
        p = ad.prompt(load_image(s.image), s.question)
        t0, a = plain.generate(p, 6)
        t1, b = rot.generate(p, 6)
        assert t0 == t1
        torch.testing.assert_close(b.logits, a.logits, atol=2e-5 * float(a.logits.abs().max()), rtol=0)


def _recipe(path, model, matmul: str):
    doc = {"name": f"rot-{matmul}", "model": str(model), "quant": {"scheme": "w4a4kv4-rot"},
           "pruning": {"budget": 0.55, "n_visual": 144, "merge": "proportional",
                       "stages": [{"layer": 0, "keep": 100, "weights": {"attention": 0.0, "diversity": 1.0}},
                                  {"layer": 1, "keep": 72},
                                  {"layer": 3, "keep": 20, **S_WEIGHTED}]},
           "export": {"max_new_tokens": 4, "matmul": matmul}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("matmul", ["float", "integer"])
def test_rotated_build_verifies_exactly(tiny_normed, tmp_path, matmul):
    """The rotated W4A4KV4 preset (per-channel weights), pruned at three stages (diversity, attention,
    all four signals) with merging, passes the exact parity check (every kept index and answer
    equal, logits within the SQNR floor); the graphs hold the two online rotations (decoder input,
    and down_proj's input in every layer) and, with export.matmul: integer, one MatMulInteger per
    linear and no dequantized weight."""
    from quota_export.build import build

    res = build(load_recipe(_recipe(tmp_path / "r.yaml", tiny_normed, matmul)), tmp_path / "out", str(TEST_SPLIT),
                6, threads=1)
    p = res.manifest["parity"]
    assert p["kept_index_agreement_per_stage"] == [1.0, 1.0, 1.0] and p["answer_agreement"] == 1.0
    for graph in ("prefill.onnx", "decode.onnx"):
        nodes = onnx.load(res.out / graph).graph.node
        scopes = {n.name.split("/hadamard/")[0] for n in nodes if "/hadamard/" in n.name}
        assert scopes == {f"/model/layers.{l}/mlp/down_proj" for l in range(4)}, graph
        assert any(n.name.startswith("/model/rotate_input/") for n in nodes), graph
        ops = collections.Counter(n.op_type for n in nodes)
        if matmul == "integer":
            assert ops["MatMulInteger"] == 4 * 7 and ops["DequantizeLinear"] == 0, graph


def test_rotation_refused_for_non_hadamard_sizes(tiny_llava):
    ad = models.load(tiny_llava)
    spec = ad.decoder_spec()
    ad.decoder_spec = lambda: dataclasses.replace(spec, intermediate=18944)  # 2^8 * 74: no Hadamard matrix
    with pytest.raises(UserError, match=r"^quant\.activations\.rotation: hadamard needs .* this model's "
                                        r"intermediate size 18944 is not \(use rotation: none\)$"):
        Deployed(ad, DeployConfig.of("w4a4kv4-rot"))


def test_rotation_lowers_for_tensorrt(tmp_path):
    """The rotation's ops pass TensorRT's operator rules in fp32 (group-64 weights: per-channel INT4
    blocks wider than 128 are not TensorRT's, rotation or not); no engine here (no GPU)."""
    from conftest import make_tiny_llava

    from quota_export.lower import tensorrt_target
    from quota_export.recipe import SCHEMES
    from quota_export.reference import StageCfg

    ad = models.load(make_tiny_llava(tmp_path / "m", hidden=128, seed=3))  # intermediate 320 = 16 x Paley 20
    q = SCHEMES["w4a4kv4-rot"].model_copy(deep=True)
    q.weights.granularity, q.weights.group_size = "group", 64
    dep = Deployed(ad, DeployConfig(quant=q, stages=[StageCfg(1, 72, (0.0, 1.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0))]))
    graphs = tensorrt_target.lower(dep, 3, 21)
    assert tensorrt_target.violations(graphs) == []
    names = [n.name for n in graphs["prefill.onnx"].graph.node]
    assert any(n.startswith("/model/rotate_input/") for n in names)
    assert any(n.startswith("/model/layers.3/mlp/down_proj/hadamard/") for n in names)


def test_signals_read_the_checkpoint_basis(tiny_normed):
    """With rotation the code cosine and the input's quantization risk are those of the checkpoint's
    basis (Deployed.signal_qkv): at layer 0, where both models see the same embeddings, the rotated
    model's signal codes are the plain model's (up to the last-bit noise of rotating there and back),
    while the codes its linears really read are other ones."""
    from quota_export.data import load_bench, load_image

    ad = models.load(tiny_normed)
    plain, rot = Deployed(ad, DeployConfig.of("w4a4kv4")), Deployed(ad, DeployConfig.of("w4a4kv4-rot"))
    s = load_bench(TEST_SPLIT, limit=1)[0]
    p = ad.prompt(load_image(s.image), s.question)
    emb, pos = plain.embed_prompt(p), p.positions()
    a = plain.signal_qkv(0, emb, pos)
    b = rot.signal_qkv(0, rot.stream_in(emb), pos)
    assert (a.codes == b.codes).float().mean() > 0.99
    assert (a.codes != rot.qkv(0, rot.stream_in(emb), pos).codes).float().mean() > 0.5
    sp, sr = (d.signals(0, x, pos, p.visual_start, p.n_visual) for d, x in ((plain, emb), (rot, rot.stream_in(emb))))
    torch.testing.assert_close(sr.diversity, sp.diversity, atol=2e-2, rtol=0)
    torch.testing.assert_close(sr.magnitude, sp.magnitude, atol=1e-3 * float(sp.magnitude.max()), rtol=0)


def test_calibrated_weights_name_their_rotation(tiny_llava, tmp_path):
    """A GPTQ weights file records the rotation its codes were made for; a recipe with another one
    is refused in one line (old files without the entry are `none`)."""
    from quota_export.qweights import load_qweights, save_with_recipe, weight_meta
    from quota_export.recipe import Pruning, Quant, Recipe
    from quota_export.reference import rtn_weights

    ad = models.load(tiny_llava)
    rot = Recipe(name="r", model=str(tiny_llava), quant=Quant(scheme="w4a4kv4-rot"),
                 pruning=Pruning(budget=1.0, n_visual=144, stages=[]))
    cfg = DeployConfig.from_recipe(rot)
    wq = rot.resolved_quant().weights.model_copy(update={"algorithm": "gptq"})
    qw = rtn_weights(ad, cfg)
    written, _ = save_with_recipe(rot.model_copy(update={"quant": Quant(scheme="w4a4kv4-rot", weights=wq)}), qw,
                                  weight_meta(wq, 4, ad, sorted(qw), "hadamard"), tmp_path / "r.yaml")
    got = load_qweights(load_recipe(tmp_path / "r.yaml"), ad, cfg)
    assert all(torch.equal(got[n].q, qw[n].q) for n in qw)
    doc = yaml.safe_load((tmp_path / "r.yaml").read_text())
    doc["quant"]["activations"] = {"bits": 4, "rotation": "none"}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(doc))
    plain = load_recipe(tmp_path / "plain.yaml")
    with pytest.raises(UserError, match=r"^quant\.weights\.calibrated: .*r\.weights\.safetensors: made for "
                                        r"quant\.activations\.rotation hadamard, the recipe has none$"):
        load_qweights(plain, ad, DeployConfig.from_recipe(plain))
