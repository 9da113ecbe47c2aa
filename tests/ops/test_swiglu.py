import numpy as np
import torch
from op_harness import onnx_run, randn

from quota_export.ops.graph import FLOAT
from quota_export.ops.swiglu import swiglu, swiglu_onnx


def test_swiglu_torch_equals_onnx():
    g, u = randn(1, 6, 32, seed=1, scale=3.0), randn(1, 6, 32, seed=2)
    want = swiglu(g, u, torch.float64)
    (got,) = onnx_run(lambda e, gi, ui: [(swiglu_onnx(e, gi, ui, "mlp"), FLOAT)], {"g": g.numpy(), "u": u.numpy()})
    np.testing.assert_array_equal(got, want.numpy())
