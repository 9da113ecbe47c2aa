"""The `tensorrt` lowering: TensorRT's operator rules hold on every graph, and the graphs (gathers
inlined to standard ops) match the reference on ONNX Runtime. Engines need TensorRT + a GPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT

from calib_data.shapes import make_sample, render
from quota_export import models
from quota_export.lower import onnx_target, tensorrt_target
from quota_export.recipe import ActQuant, KVQuant, ResolvedQuant, WeightQuant
from quota_export.reference import DeployConfig, Deployed, StageCfg
from quota_export.verify import sqnr_db

TARGETS = [r"^model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$"]


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory):
    from conftest import make_tiny_llava

    torch.set_num_threads(1)
    # hidden 128 / MLP 320: both divisible by TensorRT's INT4 block size 64
    return models.load(make_tiny_llava(tmp_path_factory.mktemp("t128") / "m", hidden=128, seed=3))


def deployed(adapter, kv_bits=4, merge=False, first="topk"):
    """`first`: the first stage (topk: attention score at layer 1; maxmin: max-min selection at layer 0)."""
    w0 = (0.0, 1.0, 0.0, 0.0) if first == "topk" else (0.0, 0.0, 0.0, 0.0)
    quant = ResolvedQuant(weights=WeightQuant(bits=4, group_size=64, targets=TARGETS, ignore=["lm_head"]),
                          activations=ActQuant(bits=4), kv_cache=KVQuant(bits=kv_bits))
    cfg = DeployConfig(
        quant=quant, merge=merge,
        stages=[StageCfg(1 if first == "topk" else 0, 72, w0, (1.0, 1.0, 1.0, 1.0), first),
                StageCfg(3, 20, (1.0, 1.0, 1.0, 1.0), (10.0, 0.01, 1.0, 0.5))],
    )  # fmt: skip
    return Deployed(adapter, cfg)


def session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    # exact fp32 inside ORT's fused 4-bit MatMul (its default accuracy level quantizes A to int8)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_tensorrt_target_lowers_fp32_reductions(tiny128):
    """TensorRT has no FP64: the target lowers with fp32 reductions (leaving the given Deployed as
    it is), and no graph computes in FP64 (while the onnx target of the same recipe does)."""
    from quota_export.lower.trt_check import check_model

    dep = deployed(tiny128)
    assert dep.cfg.fp64
    onnx_fp64 = [v for v in check_model(onnx_target.lower(dep, 3, 21)["prefill.onnx"]) if v.rule == "fp64"]
    assert onnx_fp64  # the checker sees the onnx target's FP64 reductions
    graphs = tensorrt_target.lower(dep, 3, 21)
    assert dep.cfg.fp64 and dep.hp == torch.float64  # a precision is a value: `dep` is unchanged
    assert dep.with_reductions(False).hp == torch.float32 and dep.with_reductions(False).W is dep.W
    for name, m in graphs.items():
        assert [v for v in check_model(m) if v.rule == "fp64"] == [], name


@pytest.mark.parametrize("kv_bits, merge, first", [(4, False, "topk"), (8, False, "topk"), (4, True, "topk"),
                                                    (4, True, "maxmin")])
def test_tensorrt_graphs_pass_checker_and_match_reference(tiny128, kv_bits, merge, first):
    dep = deployed(tiny128, kv_bits, merge, first)
    graphs = tensorrt_target.lower(dep, 3, 21)
    assert tensorrt_target.violations(graphs) == []
    prefill = graphs["prefill.onnx"]
    ops = {n.op_type for n in prefill.graph.node}
    assert "TokenGather" in ops and "QuantizeLinear" not in ops and "TopK" not in ops
    # merging: its ops (ScatterElements, the first-maximum ReduceMin ...) are in the graphs checked above
    assert ("ScatterElements" in ops) == merge
    assert any(i.name == "merge.1" for i in graphs["decode.onnx"].graph.input) == merge
    assert ("Or" in ops) == (first == "maxmin")  # the unrolled max-min steps, checked above too
    sess = session(tensorrt_target.inline_token_gathers(prefill))
    names = [o.name for o in sess.get_outputs()]
    dep = dep.with_reductions(True)  # the exact reference, as `build` checks against
    for seed in range(4):
        scene, q = make_sample(seed)
        pr = tiny128.prompt(render(scene), q["question"])
        emb = dep.embed_prompt(pr)
        T = emb.shape[1]
        ref = dep.prefill(emb, torch.arange(T)[None], pr.visual_start, pr.n_visual)
        out = dict(zip(names, sess.run(None, {"inputs_embeds": emb.numpy(), "position_ids": np.arange(T)[None]})))
        for i, k in enumerate(ref.kept):
            np.testing.assert_array_equal(out[f"kept.{i}"], k.numpy())
        for i, st in enumerate(dep.cfg.stages if merge else []):  # counts -> the reference's key bias
            got = dep.key_bias(torch.from_numpy(out[f"merge.{i}"][0]).double(), pr.visual_start)
            if i == 0:  # the first stage reads inputs both sides compute bit for bit: exact
                assert torch.equal(got, ref.cache[st.layer].bias)
            else:  # deeper, the graphs' fp32 reductions can flip an activation code, and a count moves with it
                assert out[f"merge.{i}"].sum() == pr.n_visual
                assert (got == ref.cache[st.layer].bias).double().mean() >= 0.9
        assert sqnr_db(ref.logits.numpy(), out["logits"]) >= 40.0


def test_onnx_target_graphs_are_rejected(tiny128):
    """The checker is not vacuous: INT4 activation Q/DQ with in-graph scales breaks TensorRT's rules."""
    graphs = onnx_target.lower(deployed(tiny128), 3, 21)
    rules = {v.split("[", 1)[1].split("]", 1)[0] for v in tensorrt_target.violations(graphs)}
    assert {"int4-activation", "qdq-scale-not-constant"} <= rules


def test_group_32_is_rejected_for_tensorrt(tiny128):
    dep = deployed(tiny128)
    quant = dep.cfg.quant.model_copy(update={"weights": dep.cfg.weights.model_copy(update={"group_size": 32})})
    dep32 = Deployed(tiny128, dataclasses.replace(dep.cfg, quant=quant))
    v = tensorrt_target.violations({"prefill.onnx": tensorrt_target.lower(dep32, 3, 21)["prefill.onnx"]})
    assert any("int4-block" in x for x in v)


def test_engine_reason_is_stated_here():
    from quota_export.runtime.runners import gpu_unavailable_reason

    reason = tensorrt_target.engine_unavailable_reason()
    try:
        import tensorrt  # noqa: F401

        assert reason == gpu_unavailable_reason()
    except ImportError:
        assert reason == "TensorRT is not installed (the tensorrt Python package does not import)"


@pytest.mark.gpu
def test_engine_build_on_gpu(tiny128, tmp_path):
    """UNVERIFIED here: the four engines of a tiny model's TensorRT graphs (polygraphy, strongly typed)."""
    reason = tensorrt_target.engine_unavailable_reason()
    if reason:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU: {reason}")
    from quota_export.build import io_spec
    from quota_export.runtime.tensorrt import build_engines

    graphs = tensorrt_target.lower(deployed(tiny128), 3, 21)
    for name, m in graphs.items():
        (tmp_path / name).write_bytes(m.SerializeToString())
    man = {"export": {"max_seq": 256}, "model": {"visual_start": 3, "n_visual": 144},
           "graphs": {n: io_spec(m) for n, m in graphs.items()}}
    engines = build_engines(tmp_path, man)
    assert list(engines) == ["vision.engine", "embed.engine", "prefill.engine", "decode.engine"]
    assert all(v["bytes"] > 0 and (tmp_path / k).stat().st_size == v["bytes"] for k, v in engines.items())


def test_mrope_family_builds_for_tensorrt(tmp_path, capsys):
    """M-RoPE (Qwen2-VL): TokenGather gathers the [3,1,T] position planes; the TensorRT graphs pass
    the checker and, gathers inlined, match the reference on ONNX Runtime; no engine here (exit 3)."""
    import json

    import yaml
    from conftest import make_tiny_qwen2_vl

    from quota_export.__main__ import main

    model = make_tiny_qwen2_vl(tmp_path / "m")
    r = {"name": "q", "model": str(model),
         "quant": {"scheme": "w4a4kv4", "weights": {  # TensorRT INT4 blocks are 64/128: down_proj (160 in) stays fp
             "bits": 4, "group_size": 64, "ignore": ["lm_head", r"^model\.visual\."],
             "targets": [r"^model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up)_proj)$"]}},
         "pruning": {"budget": 0.6, "n_visual": 36, "stages": [{"layer": 1, "keep": 12}]},
         "export": {"max_new_tokens": 3}}  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    bench = ROOT / "calib_data" / "shapes" / "test.jsonl"
    rc = main(["build", "--recipe", str(tmp_path / "r.yaml"), "--target", "tensorrt", "--out", str(tmp_path / "g"),
               "--bench", str(bench), "--samples", "4"])  # fmt: skip
    assert rc == 3, capsys.readouterr().err
    man = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert man["reductions"] == "fp32" and man["parity"]["kept_index_agreement"] == 1.0
    nodes = onnx.load(tmp_path / "g" / "prefill.onnx").graph.node
    assert sum(n.op_type == "TokenGather" for n in nodes) == 1
    assert main(["verify", "--artifacts", str(tmp_path / "g"), "--bench", str(bench), "--samples", "6"]) == 0
