import numpy as np
import pytest
import torch
from op_harness import onnx_run, randn

from quota_export.ops.graph import FLOAT, UINT8
from quota_export.ops.kv_cache import KVLayout, KVNames, kv_dequant_onnx, kv_fake, kv_quant_onnx, kv_quantize
from quota_export.quant.quantizers import EPS

F32 = np.float32


def np_kv(x, bits, g):
    *lead, d = x.shape
    hi = 2**bits - 1
    blocks = x.reshape(*lead, d // g, g)
    mn, mx = np.minimum(blocks.min(-1), F32(0)), np.maximum(blocks.max(-1), F32(0))
    s = np.maximum(mx - mn, F32(EPS)) / F32(hi)
    z = np.clip(np.rint(-mn / s), 0, hi).astype(F32)
    S, Z = np.repeat(s, g, axis=-1), np.repeat(z, g, axis=-1)
    q = np.clip(np.rint(x / S) + Z, 0, hi).astype(F32)
    return q, s, z, (q - Z) * S


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [4, 16])
def test_kv_matches_numpy(bits, group):
    x = randn(2, 3, 5, 16, seed=4)
    x[0, 0, 0, :] = x[0, 0, 0, :].abs() + 10.0  # all-positive token: no saturation
    x[0, 1, 0, :] = -x[0, 1, 0, :].abs() - 3.0  # all-negative token
    x[1, 2, 3, :] = 0.0
    q, s, z = kv_quantize(x, bits, group)
    nq, ns, nz, ndq = np_kv(x.numpy(), bits, group)
    assert q.dtype == torch.uint8 and z.dtype == torch.uint8
    np.testing.assert_array_equal(q.float().numpy(), nq)
    np.testing.assert_array_equal(s.numpy(), ns)
    np.testing.assert_array_equal(z.float().numpy(), nz)
    fq, _ = kv_fake(x, bits, group)
    np.testing.assert_array_equal(fq.numpy(), ndq)
    step = s.repeat_interleave(group, dim=-1)
    assert torch.all((fq - x).abs() <= step / 2 + 1e-6)  # within half a step everywhere (no saturation)


@pytest.mark.parametrize("bits, group", [(4, None), (4, 8), (8, None), (8, 4)])
def test_kv_quant_and_boundary_roundtrip_torch_equals_onnx(bits, group):
    """The cache's dequantized view and its boundary tensors (4-bit: two codes per byte) equal
    torch's; reading the boundary tensors back (decode's past.*) gives the same view."""
    kv = KVLayout(bits, group, kv_heads=2, head_dim=16)
    x = randn(1, 2, 7, 16, seed=6, scale=2.0)
    deq, (q, s, z) = kv_fake(x, bits, group)

    def build(e, xi):
        d, names = kv_quant_onnx(e, xi, kv, "kv")
        back = kv_dequant_onnx(e, names, kv, "past")
        return [(d, FLOAT), (names.q, UINT8), (names.scale, FLOAT), (names.zero, UINT8), (back, FLOAT)]

    got_d, got_q, got_s, got_z, got_back = onnx_run(build, {"x": x.numpy()}, fp64=False)
    np.testing.assert_array_equal(got_d, deq.numpy())
    qn = q.numpy()
    if bits == 4:
        qn = qn[..., 0::2] | (qn[..., 1::2] << 4)
    np.testing.assert_array_equal(got_q, qn)
    np.testing.assert_array_equal(got_s, s.numpy())
    np.testing.assert_array_equal(got_z, z.numpy())
    np.testing.assert_array_equal(got_back, deq.numpy())
    assert isinstance(KVNames("a"), KVNames)
