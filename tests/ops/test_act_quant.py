import numpy as np
import pytest
import torch
from op_harness import onnx_run, randn

from quota_export.ops.act_quant import act_quant_onnx, fake_quant_act, quant_act
from quota_export.ops.graph import FLOAT
from quota_export.quant.quantizers import EPS

F32 = np.float32


def np_act(x, bits):
    hi = 2 ** (bits - 1) - 1
    s = np.maximum(np.abs(x).max(-1, keepdims=True), F32(EPS)) / F32(hi)
    return np.clip(np.rint(x / s), -hi - 1, hi).astype(F32) * s


@pytest.mark.parametrize("bits", [4, 8])
def test_act_per_token_matches_numpy(bits):
    x = randn(3, 5, 64, seed=1)
    x[0, 0] = 0.0  # all-zero token: zeros, not NaN
    x[1, 2, 7] = 40.0  # outlier
    got = fake_quant_act(x, bits)
    np.testing.assert_array_equal(got.numpy(), np_act(x.numpy(), bits))
    assert torch.all(got[0, 0] == 0)


@pytest.mark.parametrize("target", ["onnx", "tensorrt"])
@pytest.mark.parametrize("bits", [4, 8])
def test_act_quant_torch_equals_onnx(bits, target):
    """Both targets' forms (QuantizeLinear int4/int8 + Cast; Round + Clip in float) give the torch
    codes and scales bit for bit, ties (x/s exactly half-way) included."""
    x = randn(1, 9, 32, seed=3, scale=2.0)
    x[0, 0] = 0.0
    x[0, 1, :4] = torch.tensor([0.5, 1.5, 2.5, -3.5]) * (x[0, 1].abs().max() / (2 ** (bits - 1) - 1))
    q, s = quant_act(x, bits)
    got_q, got_s = onnx_run(lambda e, xi: [(t, FLOAT) for t in act_quant_onnx(e, xi, bits, 32, "act")],
                            {"x": x.numpy()}, fp64=False, target=target)
    np.testing.assert_array_equal(got_q, q.numpy())
    np.testing.assert_array_equal(got_s, s.numpy())
    assert np.abs(got_q).max() <= 2 ** (bits - 1)
