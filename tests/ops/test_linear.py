import numpy as np
import pytest
import torch
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


# ---------------------------------------------------------------- integer form (export.matmul: integer)

INT_CASES = [  # (in, out, group or None = per channel, a_bits, symmetric, w_bits)
    (192, 48, None, 4, True, 4),
    (192, 48, 64, 4, True, 4),
    (512, 40, 32, 4, True, 4),
    (256, 24, 128, 8, True, 4),
    (256, 24, None, 8, True, 4),
    (192, 32, 64, 4, False, 4),
    (64, 16, 32, 8, False, 4),
    (64, 16, 32, 4, True, 8),  # 8-bit weights: the exact grid needs narrow layers
    (64, 16, None, 4, True, 8),
]


@pytest.mark.parametrize("K, N, group, a_bits, sym, w_bits", INT_CASES)
def test_integer_linear_equals_torch(K, N, group, a_bits, sym, w_bits):
    """uint8 codes x int8 weight planes (MatMulInteger) give the torch linear's bits, including
    tokens whose codes all sit at +qmax, -qmax or alternate (the largest pair sums the u8 x s8
    kernel sees: a digit width that let it saturate, or overflow int8, fails here)."""
    from quota_export.ops.act_quant import act_quant_onnx
    from quota_export.ops.linear import integer_linear_onnx, integer_plan

    w, b = randn(N, K, seed=1) * torch.linspace(0.05, 1.0, K), randn(N, seed=2)
    x = randn(1, 9, K, seed=3, scale=3.0)
    x[0, 0], x[0, 1], x[0, 3] = 1.0, -1.0, 0.0
    x[0, 2, ::2], x[0, 2, 1::2] = 1.0, -1.0
    qw = quantize_weight(w, w_bits, sym, group or K, scale_bits=exact_scale_bits(K, w_bits, sym, a_bits))
    want = linear(linear_input(x, a_bits, True), qw.dequant(), b)
    plan = integer_plan(qw, a_bits)
    assert plan is not None

    def build(e, xi):
        codes, s = act_quant_onnx(e, xi, a_bits, K, "in", uint8=True)
        return [(integer_linear_onnx(e, codes, qw, plan, a_bits, s, b, "lin"), FLOAT)]

    (got,) = onnx_run(build, {"x": x.numpy()}, fp64=False)
    np.testing.assert_array_equal(got, want.numpy())


def test_integer_planes_are_the_weight():
    """sum_j planes_j * factors_j == W'^T exactly, and the planes fit int8."""
    from quota_export.ops.linear import integer_plan, integer_planes

    qw = quantize_weight(randn(40, 192, seed=6), 4, True, 64, scale_bits=exact_scale_bits(192, 4, True, 4))
    plan = integer_plan(qw, 4)
    assert plan.planes == 3  # 10-bit scale mantissas at 192 inputs, 4-bit digits
    arr = integer_planes(qw, plan).astype(np.float64).reshape(192, plan.planes, 40)
    assert np.array_equal((arr * plan.factors[None]).sum(1), qw.dequant().numpy().T.astype(np.float64))
    assert np.abs(arr).max() <= 127


def test_no_integer_form_where_the_kernel_could_saturate():
    """8-bit weights (|code| <= 127) x 8-bit activations: 2 x 255 x 127 > 2^15, so no plan (the
    linear keeps the float form); x 4-bit activations they fit (group scales: 1-bit digit planes)."""
    from quota_export.ops.linear import integer_plan

    w = randn(16, 64, seed=7)
    for group in (32, 64):
        qw = quantize_weight(w, 8, True, group, scale_bits=2)
        assert integer_plan(qw, 8) is None
        plan = integer_plan(qw, 4)
        assert plan is not None and (plan.digits is None or plan.digits.max() <= 1)


def test_row_exponent():
    from quota_export.ops.linear import row_exponent

    s = np.array([[3 * 2.0**-9, 5 * 2.0**-7], [2.0**-3, 2.0**-3]], np.float32)
    assert row_exponent(s).tolist() == [-9, -3]
