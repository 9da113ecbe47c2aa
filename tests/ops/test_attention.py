import numpy as np
import pytest
import torch
from op_harness import onnx_run, randn

from quota_export.ops.attention import Heads, attend, attend_onnx, pow2_scale
from quota_export.ops.graph import DOUBLE, FLOAT

HD = Heads(heads=4, kv_heads=2, head_dim=8)


@pytest.mark.parametrize("head_dim", [8, 16])  # 16: 1/sqrt(d) = 1/4 scales q, not the scores
@pytest.mark.parametrize("offset, with_bias", [(0, False), (0, True), (None, True), (3, False)])
def test_attention_torch_equals_onnx(offset, with_bias, head_dim):
    """Grouped KV heads, causal mask at an offset (None: none), merged keys' log-count bias on the
    first T0 keys; fp64 reductions: the probabilities to the last bits of fp64, the output (rounded
    once to fp32) bit for bit."""
    HD = Heads(heads=4, kv_heads=2, head_dim=head_dim)
    q, k, v = randn(1, 4, 5, head_dim, seed=1), randn(1, 2, 8, head_dim, seed=2), randn(1, 2, 8, head_dim, seed=3)
    bias = torch.tensor([0.0, 0.0, 1.0986, 0.6931, 0.0], dtype=torch.float64) if with_bias else None
    p, o = attend(q[:, :, -5:] if offset is None else q, k, v, HD, torch.float64, offset, bias)

    def build(e, qi, ki, vi):
        b = (e.hc(bias.numpy()), bias.numel()) if with_bias else None
        pr, out = attend_onnx(e, qi, ki, vi, HD, offset, "attn", b)
        return [(pr, DOUBLE), (out, FLOAT)]

    got_p, got_o = onnx_run(build, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}, fp64=True)
    np.testing.assert_allclose(got_p, p.numpy(), rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(got_o, o.numpy())
    if offset == 0:
        assert (got_p[0, :, 0, 1:] == 0).all()  # query 0 sees key 0 only


def test_pow2_scale():
    assert [d for d in range(1, 300) if pow2_scale(d)] == [1, 4, 16, 64, 256]


@pytest.mark.parametrize("T", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_output_form_equals_torch(T, with_bias):
    """probs=False (the layers' attention): normalized after PV and, causal at offset 0, queries in
    QUERY_CHUNKS blocks (some empty when T < QUERY_CHUNKS); the output bit for bit, and no
    probabilities."""
    q, k, v = randn(1, 4, T, 16, seed=T), randn(1, 2, T, 16, seed=T + 1), randn(1, 2, T, 16, seed=T + 2)
    t0 = min(T, 3)
    bias = torch.tensor([0.0, 1.0986, 0.6931][:t0], dtype=torch.float64) if with_bias else None
    hd = Heads(heads=4, kv_heads=2, head_dim=16)
    _, o = attend(q, k, v, hd, torch.float64, 0, bias)

    def build(e, qi, ki, vi):
        b = (e.hc(bias.numpy()), t0) if with_bias else None
        pr, out = attend_onnx(e, qi, ki, vi, hd, 0, "attn", b, probs=False)
        assert pr is None
        return [(out, FLOAT)]

    (got,) = onnx_run(build, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}, fp64=True)
    np.testing.assert_array_equal(got, o.numpy())
