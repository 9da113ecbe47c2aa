import numpy as np
import pytest
import torch
from op_harness import onnx_run, randn

from quota_export.ops.base import hp_dtype
from quota_export.ops.graph import FLOAT
from quota_export.ops.norm import rmsnorm, rmsnorm_onnx


@pytest.mark.parametrize("fp64", [True, False])
def test_rmsnorm_torch_equals_onnx(fp64):
    x, w = randn(1, 7, 64, seed=1, scale=3.0), randn(64, seed=2)
    want = rmsnorm(x, w, 1e-6, hp_dtype(fp64))
    (got,) = onnx_run(lambda e, xi: [(rmsnorm_onnx(e, xi, w.numpy(), 1e-6, "norm"), FLOAT)], {"x": x.numpy()}, fp64)
    if fp64:  # every result rounded once from fp64: bit for bit
        np.testing.assert_array_equal(got, want.numpy())
    else:
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)
    assert want.dtype == torch.float32
