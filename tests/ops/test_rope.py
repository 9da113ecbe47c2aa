import numpy as np
import pytest
import torch
from op_harness import onnx_run, randn

from quota_export.ops.base import hp_dtype
from quota_export.ops.graph import FLOAT
from quota_export.ops.rope import rope, rope_onnx, rope_tables_onnx

D = 16
INV = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))


@pytest.mark.parametrize("mrope", [False, True])
@pytest.mark.parametrize("fp64", [True, False])
def test_rope_torch_equals_onnx(mrope, fp64):
    x = randn(1, 3, 9, D, seed=7)
    if mrope:  # three position planes, frequency f reads plane planes[f]
        planes = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
        pos = torch.stack([torch.arange(9), torch.arange(9) * 2, torch.arange(9) + 5])[:, None]
    else:
        planes, pos = None, torch.arange(9)[None] + 100
    want = rope(x, pos, INV, planes, hp_dtype(fp64))

    def build(e, xi, pi):
        cos, sin = rope_tables_onnx(e, pi, INV.numpy(), None if planes is None else planes.numpy(), "tables")
        return [(rope_onnx(e, xi, cos, sin, D, "rope"), FLOAT)]

    (got,) = onnx_run(build, {"x": x.numpy(), "pos": pos.numpy()}, fp64)
    if fp64:
        np.testing.assert_array_equal(got, want.numpy())
    else:  # fp32 Cos/Sin differ from torch's in the last bits
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
