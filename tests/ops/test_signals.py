"""The stage score from its four signals, the code cosine, max-min picks and merge counts: torch vs
ONNX on the same inputs (fp64 reductions: equal scores on the 2^-10 grid, equal picks and counts)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from op_harness import onnx_run, randn

from quota_export.ops.attention import Heads
from quota_export.ops.graph import DOUBLE, FLOAT
from quota_export.ops.maxmin import maxmin_score, maxmin_score_onnx
from quota_export.ops.merge import key_bias, key_bias_onnx, merge_counts, merge_counts_onnx
from quota_export.ops.signals import cosine, cosine_onnx, integer_dots_exact_fp32, score_onnx, signals_from, stage_score

HD = Heads(heads=2, kv_heads=1, head_dim=8)
S0, N, T, D = 2, 10, 16, 16


def inputs(seed=0):
    h = randn(1, T, D, seed=seed, scale=2.0)
    xn = randn(1, T, D, seed=seed + 1)
    scale = xn.abs().amax(-1, keepdim=True) / 7
    codes = torch.clamp(torch.round(xn / scale), -8, 7)
    codes[0, S0 + 4] = codes[0, S0 + 1]  # a repeated visual token: cosine 1, diversity 0
    t = {"h": h, "xn": xn, "codes": codes, "scale": scale, "q": randn(1, 2, T, 8, seed=seed + 2),
         "k": randn(1, 1, T, 8, seed=seed + 3), "v": randn(1, 1, T, 8, seed=seed + 4)}
    t["kc"] = torch.round(t["k"] * 4) / 4  # a coarser cache view
    t["vc"] = torch.round(t["v"] * 4) / 4
    return t


@pytest.mark.parametrize("weights", [(0.0, 1.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0), (0.5, 0.0, 1.0, 2.0)])
def test_stage_score_torch_equals_onnx(weights):
    t = inputs()
    a = SimpleNamespace(q=t["q"], k=t["k"], v=t["v"], k_cache=t["kc"], v_cache=t["vc"], xn=t["xn"],
                        codes=t["codes"], x_dequant=t["codes"] * t["scale"])
    sigma = (10.0, 0.01, 1.0, 0.5)
    bias = torch.tensor([0.0, 0.0] + [0.5] * N, dtype=torch.float64)
    sig = signals_from(a, t["h"], S0, N, HD, torch.float64, True, bias)
    want = stage_score(weights, sigma, *sig)
    assert abs(float(sig.diversity[0, 4])) < 1e-12 and float(sig.diversity[0, 0]) == 2.0

    def build(e, h, xn, codes, scale, q, k, v, kc, vc):
        an = SimpleNamespace(q=q, k=k, v=v, k_cache=kc, v_cache=vc, xn=xn, codes=codes, scale=scale)
        cos = cosine_onnx(e, codes, S0, N)
        return [(score_onnx(e, weights, sigma, an, h, cos, S0, N, HD, True, (e.hc(bias.numpy()), bias.numel())), FLOAT)]

    (got,) = onnx_run(build, {k: v.numpy() for k, v in t.items()})
    np.testing.assert_array_equal(got, want.numpy())


def test_maxmin_and_merge_torch_equal_onnx():
    t = inputs(5)
    cs = cosine(t["codes"], S0, N, torch.float64)
    k = 4
    score = maxmin_score(cs, k)
    idx = torch.sort(torch.argsort(-score[0], stable=True)[:k]).values[None]
    cnt = torch.arange(1, N + 1, dtype=torch.float64)
    counts = merge_counts(cs, idx, cnt)
    assert counts.sum() == cnt.sum()  # every dropped token's count lands on one kept token
    bias = key_bias(counts, S0, torch.float64)

    def build(e, codes, kept, c):
        cos = cosine_onnx(e, codes, S0, N)
        new = merge_counts_onnx(e, cos, kept, c, k)
        b, _ = key_bias_onnx(e, new, k, S0, N + cnt.sum().int().item(), "bias")
        return [(cos, DOUBLE), (maxmin_score_onnx(e, cos, N, k), FLOAT), (new, DOUBLE), (b, DOUBLE)]

    got_cs, got_score, got_counts, got_bias = onnx_run(
        build, {"codes": t["codes"].numpy(), "kept": idx[0].numpy(), "c": cnt[None].numpy()})
    np.testing.assert_allclose(got_cs, cs.numpy(), rtol=1e-15, atol=1e-15)  # fp64 last bits
    np.testing.assert_array_equal(got_score, score.numpy())
    np.testing.assert_array_equal(got_counts[0], counts.numpy())
    np.testing.assert_array_equal(got_bias, bias.numpy())


def test_cosine_of_integer_codes_in_fp32_is_the_hp_cosine():
    """The fp32 form of the code cosine (integer codes, `integer_codes=True`) gives the hp form's
    bits: at the bound (4-bit codes at -8 everywhere and 2^18 features, every |f|^2 = 2^24) and on
    random codes with a repeated token."""
    assert integer_dots_exact_fp32(4, 2**18) and not integer_dots_exact_fp32(4, 2**18 + 1)
    assert integer_dots_exact_fp32(8, 1024) and not integer_dots_exact_fp32(8, 1025)
    assert not integer_dots_exact_fp32(16, 1)
    big = torch.full((1, 3, 2**18), -8.0)
    big[0, 1, ::2] = 7.0
    rnd = inputs(3)["codes"]
    for codes, s0, n in ((big, 0, 3), (rnd, S0, N)):
        want = cosine(codes, s0, n, torch.float64)

        def build(e, c):
            return [(cosine_onnx(e, c, s0, n, integer_codes=True), DOUBLE), (cosine_onnx(e, c, s0, n), DOUBLE)]

        got_fp32, got_hp = onnx_run(build, {"c": codes.numpy()})
        np.testing.assert_array_equal(got_fp32, got_hp)
        np.testing.assert_allclose(got_fp32, want.numpy(), rtol=1e-15, atol=1e-15)
