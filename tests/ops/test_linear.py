import numpy as np
import pytest
from op_harness import onnx_run, randn

from quota_export.ops.graph import FLOAT
from quota_export.ops.linear import linear, linear_input, linear_onnx, weight_onnx
from quota_export.quant.quantizers import exact_scale_bits, quantize_weight


@pytest.mark.parametrize("w_bits, symmetric, group", [(4, True, 32), (4, False, 16), (8, True, 64), (4, True, 64)])
@pytest.mark.parametrize("a_bits", [4, 8, 16])
def test_quantized_linear_torch_equals_onnx(w_bits, symmetric, group, a_bits):
    """Integer activations x DQ(int4/int8 blocked weights), then the per-token scale and the bias:
    with snapped scales (exact accumulation) ONNX Runtime's kernels give torch's values bit for bit."""
    K, N = 64, 48
    w, b, x = randn(N, K, seed=1), randn(N, seed=2), randn(1, 11, K, seed=3, scale=4.0)
    sb = exact_scale_bits(K, w_bits, symmetric, a_bits) if a_bits < 16 else None
    qw = quantize_weight(w, w_bits, symmetric, group, scale_bits=sb)
    want = linear(linear_input(x, a_bits, True), qw.dequant(), b)

    def build(e, xi):
        from quota_export.ops.act_quant import act_quant_onnx

        xq = act_quant_onnx(e, xi, a_bits, K, "in") if a_bits < 16 else None
        wt = weight_onnx(e, qw, None, "w")
        return [(linear_onnx(e, xq[0] if xq else xi, wt, xq[1] if xq else None, b, "lin"), FLOAT)]

    (got,) = onnx_run(build, {"x": x.numpy()}, fp64=False)
    if a_bits < 16:
        np.testing.assert_array_equal(got, want.numpy())
    else:  # float activations: the sum's order differs, only float noise
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-4)


def test_unquantized_weight_is_a_float_constant():
    w, x = randn(8, 16, seed=4), randn(1, 3, 16, seed=5)
    want = linear((x, None), w)
    (got,) = onnx_run(lambda e, xi: [(linear_onnx(e, xi, weight_onnx(e, None, w, "w"), None, None, "lin"), FLOAT)],
                      {"x": x.numpy()}, fp64=False)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)
