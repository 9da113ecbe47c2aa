"""`export.matmul: integer`: the onnx target's MatMulInteger form of the exact quantized linears
computes the float form's bits (lower/intlinear.py), on single linears and on whole builds."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
import yaml

from quota_export import UserError
from quota_export.build import build
from quota_export.lower import intlinear
from quota_export.lower.graph import FLOAT, Graph
from quota_export.quant.quantizers import exact_scale_bits, quant_act, quantize_weight
from quota_export.recipe import load_recipe
from quota_export.reference import DeployConfig
from conftest import ROOT

TEST_SPLIT = ROOT / "calib_data" / "shapes" / "test.jsonl"


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _integer_graph(qw, K: int, N: int, a_bits: int) -> onnx.ModelProto:
    """x [1,T,K], per-token scale s [1,T,1] -> codes -> integer matmul -> * s (as DecoderLowering.linear)."""
    g = Graph("int")
    x = g.input("x", FLOAT, [1, "T", K])
    s = g.input("s", FLOAT, [1, "T", 1])
    p = intlinear.plan(qw, a_bits)
    assert p is not None
    y = intlinear.integer_matmul(g, intlinear.act_codes(g, x, s, a_bits), qw, a_bits, p)
    g.output(g.op("Mul", [y, s]), "y", FLOAT, [1, "T", N])
    return g.model(21)


CASES = [  # (in, out, group or None = per channel, a_bits, symmetric)
    (192, 48, None, 4, True),
    (192, 48, 64, 4, True),
    (512, 40, 32, 4, True),
    (256, 24, 128, 8, True),
    (256, 24, None, 8, True),
    (192, 32, 64, 4, False),
    (64, 16, 32, 8, False),
]
W8_CASES = [(64, 16, 32, 4), (64, 16, None, 4)]  # 8-bit weights (exact grid needs narrow layers)


@pytest.mark.parametrize("K,N,group,a_bits,sym,w_bits", [c + (4,) for c in CASES] + [c + (True, 8) for c in W8_CASES])
def test_integer_linear_equals_exact_float_product(K, N, group, a_bits, sym, w_bits):
    """The graph's output equals (q_a @ W'^T) * s computed in float64 (exact) and rounded once, i.e.
    the reference's `Deployed.mm` on the exact grid, for every token, including tokens whose
    codes sit at the extremes (the largest pair sums the u8 x s8 kernel can see)."""
    torch.manual_seed(K + N + a_bits)
    w = torch.randn(N, K) * torch.linspace(0.01, 0.2, K)
    qw = quantize_weight(w, w_bits, sym, group or K, scale_bits=exact_scale_bits(K, w_bits, sym, a_bits))
    x = torch.randn(1, 9, K) * 3
    x[0, 0] = 1.0  # every code at +qmax
    x[0, 1] = -1.0  # every code at -qmax
    x[0, 2, ::2], x[0, 2, 1::2] = 1.0, -1.0
    x[0, 3] = 0.0  # the EPS floor
    q, s = quant_act(x, a_bits)
    exact = (q.double() @ qw.dequant().double().T * s.double()).float()
    assert torch.equal((q @ qw.dequant().T) * s, exact)  # the float path is exact on this grid
    (y,) = _run(_integer_graph(qw, K, N, a_bits), {"x": x.numpy(), "s": s.numpy()})
    assert np.array_equal(y, exact.numpy())


def test_planes_are_the_weight():
    """sum_j planes_j * factors_j == W'^T, and the digit planes fit int8."""
    torch.manual_seed(0)
    qw = quantize_weight(torch.randn(40, 192), 4, True, 64, scale_bits=exact_scale_bits(192, 4, True, 4))
    p = intlinear.plan(qw, 4)
    assert p.planes == 3  # 10-bit scale mantissas at 192 inputs, 4-bit digits
    arr = intlinear.planes_array(qw, p).astype(np.float64).reshape(192, p.planes, 40)
    assert np.array_equal((arr * p.factors[None]).sum(1), qw.dequant().numpy().T.astype(np.float64))
    assert np.abs(arr).max() <= 127


def test_no_integer_form_where_the_kernel_could_saturate():
    """8-bit weights (|code| <= 127) times 8-bit activations: 2 x 255 x 127 > 2^15, so the linear
    keeps the float form; times 4-bit activations they fit (group scales: 1-bit digit planes)."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for group in (32, 64):
        qw = quantize_weight(w, 8, True, group, scale_bits=2)
        assert intlinear.plan(qw, 8) is None
        p = intlinear.plan(qw, 4)
        assert p is not None and (p.digits is None or p.digits.max() <= 1)


def test_row_exponent():
    s = np.array([[3 * 2.0**-9, 5 * 2.0**-7], [2.0**-3, 2.0**-3]], np.float32)
    assert intlinear.row_exponent(s).tolist() == [-9, -3]


def _recipe(path, model, matmul: str, accumulation: str = "exact"):
    doc = {"name": f"int-{matmul}", "model": str(model),
           "quant": {"scheme": "w4a4kv4", "weights": {"bits": 4, "group_size": 32, "accumulation": accumulation}},
           "pruning": {"budget": 0.55, "n_visual": 144, "merge": "proportional",
                       "stages": [{"layer": 1, "keep": 72},
                                  {"layer": 3, "keep": 20, "weights": {"magnitude": 1.0, "attention": 1.0,
                                                                       "risk": 1.0, "diversity": 1.0}}]},
           "export": {"max_new_tokens": 4, "matmul": matmul}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_integer_build_matches_float_build_bit_for_bit(tiny_llava, tmp_path):
    """A merged, pruned W4A4KV4 build with export.matmul: integer passes its parity check, holds
    MatMulInteger instead of the 4-bit MatMul, and its prefill and decode outputs (logits, cache,
    kept indices, merge counts) equal the float build's bit for bit."""
    from quota_export.data import load_bench, load_image
    from quota_export.runtime.ort import OrtRunner

    res = {m: build(load_recipe(_recipe(tmp_path / f"{m}.yaml", tiny_llava, m)), tmp_path / m, str(TEST_SPLIT), 6,
                    threads=1) for m in ("float", "integer")}
    p = res["integer"].manifest["parity"]
    assert p["kept_index_agreement_per_stage"] == [1.0, 1.0] and p["answer_agreement"] == 1.0
    ops = collections.Counter(n.op_type for n in onnx.load(res["integer"].out / "prefill.onnx").graph.node)
    assert ops["MatMulInteger"] == 4 * 7 and ops["DequantizeLinear"] == 0
    runners = {m: OrtRunner(r.out, threads=1) for m, r in res.items()}
    for s in load_bench(TEST_SPLIT, limit=3):
        ids, pix = runners["float"].encode(load_image(s.image), s.question)
        emb = runners["float"].embeds(ids, pix)
        feeds = {"inputs_embeds": emb, "position_ids": runners["float"].positions(emb.shape[1])}
        outs = {m: r._run("prefill.onnx", feeds) for m, r in runners.items()}
        assert outs["float"].keys() == outs["integer"].keys()
        for k in outs["float"]:
            assert np.array_equal(outs["float"][k], outs["integer"][k]), k
        step = {"inputs_embeds": emb[:, -1:], "position_ids": runners["float"].positions(emb.shape[1] + 1)[..., -1:],
                **{k.replace("present.", "past.", 1): v for k, v in outs["float"].items() if k.startswith("present.")},
                **{k: v for k, v in outs["float"].items() if k.startswith("merge.")}}
        dec = {m: r._run("decode.onnx", step) for m, r in runners.items()}
        for k in dec["float"]:
            assert np.array_equal(dec["float"][k], dec["integer"][k]), k


def test_integer_needs_exact_accumulation(tiny_llava, tmp_path):
    r = load_recipe(_recipe(tmp_path / "r.yaml", tiny_llava, "integer", accumulation="float"))
    with pytest.raises(UserError, match=r"^export\.matmul: 'integer' needs quant\.weights\.accumulation: exact"):
        DeployConfig.from_recipe(r)


def test_tensorrt_target_ignores_integer(tiny_llava, tmp_path):
    """The tensorrt target's decoder graphs stay the float form whatever export.matmul says."""
    from quota_export.build import load_model
    from quota_export.lower.decoder import DecoderLowering
    from quota_export.reference import Deployed

    graphs = {}
    for m in ("float", "integer"):
        recipe = load_recipe(_recipe(tmp_path / f"{m}.yaml", tiny_llava, m))
        dep = Deployed(load_model(recipe), DeployConfig.from_recipe(recipe))
        dep.set_reductions(fp64=False)
        low = DecoderLowering(dep, 144, 5, target="tensorrt")
        graphs[m] = [low.prefill(21).SerializeToString(), low.decode(21).SerializeToString()]
    assert graphs["float"] == graphs["integer"]
