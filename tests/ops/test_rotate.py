import numpy as np
import pytest
import torch
from op_harness import onnx_run, randn

from quota_export.ops.graph import FLOAT
from quota_export.ops.rotate import Rotation, rotate, rotate_onnx
from quota_export.quant.hadamard import random_hadamard, random_signs


@pytest.mark.parametrize("n, signed", [(64, False), (192, True), (512, False), (44, True)])
def test_rotate_is_the_matrix(n, signed):
    """rotate(x) = x @ (diag(signs) H) for the Sylvester (64, 512), Sylvester x Paley (192 = 16 * 12)
    and Paley-only (44) sizes."""
    rot = Rotation.of(n, random_signs(n, 3) if signed else None)
    x = randn(1, 5, n, seed=n)
    want = x.double() @ (random_hadamard(n, 3) if signed else rot.matrix())
    torch.testing.assert_close(rotate(x, rot, torch.float64).double(), want, atol=1e-6, rtol=1e-6)
    if signed:
        assert torch.equal(rot.matrix(), random_hadamard(n, 3))
    inv = rot.inverted()  # the transpose: back to x
    torch.testing.assert_close(rotate(rotate(x, rot, torch.float64), inv, torch.float64), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inv.matrix(), rot.matrix().T, atol=0, rtol=0)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("fp64", [True, False])
@pytest.mark.parametrize("n", [192, 512])
def test_rotate_torch_equals_onnx(n, fp64, inverse):
    rot = Rotation.of(n, random_signs(n, 0) if n == 192 else None)
    rot = rot.inverted() if inverse else rot
    x = randn(1, 7, n, seed=1, scale=3.0)
    x[0, 2, 5] = 4000.0  # an outlier channel
    x[0, 3, :] = 0.0
    want = rotate(x, rot, torch.float64 if fp64 else torch.float32)
    (got,) = onnx_run(lambda e, xi: [(rotate_onnx(e, xi, rot, "mlp/rotate"), FLOAT)], {"x": x.numpy()}, fp64=fp64)
    np.testing.assert_array_equal(got, want.numpy())


def test_not_a_hadamard_size():
    with pytest.raises(ValueError, match="74 is not a Hadamard size"):
        Rotation.of(74)
