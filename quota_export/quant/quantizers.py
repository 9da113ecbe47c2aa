"""Quantizer primitives, numerically identical to ONNX QuantizeLinear / DequantizeLinear.

ONNX:  q = saturate(round_half_even(x / scale) + zero_point);  x' = (q - zero_point) * scale
Here every scale is computed with the same fp32 ops, in the same order, as the graphs compute
it (the ONNX forms in quota_export/ops/), so the reference and the graphs agree bit for bit. The
activation and KV-cache quantizers live with their ONNX forms: ops/act_quant.py, ops/kv_cache.py.

    granularity     scale shape (x: [..., n])     used for
    per-token       [..., 1]  (dynamic, in-graph)  activations
    per-tensor      []        (static constant)    activations (static)
    per-channel     [out, 1]                       weights ([out, in] torch layout)
    per-group g     [out, in/g]                    weights (blocked along in)
    kv group g      [..., n/g] asymmetric          KV cache (keys after RoPE)

Exact accumulation. A quantized linear runs as (integer activations q_a) @ W' then * s_token,
with W' = q_w * s_group. If every group scale of a weight row is an integer m < 2^B times one
power of two 2^e (`snap_scales`), every product q_a * q_w * m * 2^e is an integer multiple of 2^e
and, with B from `exact_scale_bits`, every partial sum stays below 2^24 * 2^e: fp32 then adds
exactly in any order, so ONNX Runtime's 4-bit MatMul kernel, a TensorRT GEMM in fp32 and torch
agree bit for bit however they block, vectorise or fuse the sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-8  # floor of a dynamic range, so an all-zero row quantizes to zeros, not NaN


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    if bits not in (4, 8):
        raise ValueError(f"unsupported bit width {bits} (supported: 4, 8)")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point, bits: int, signed: bool) -> torch.Tensor:
    """ONNX QuantizeLinear; returns the integers as x's float dtype."""
    lo, hi = qrange(bits, signed)
    q = torch.round(x / scale)  # torch.round is round-half-to-even, as ONNX specifies
    if zero_point is not None:
        q = q + zero_point
    return q.clamp(lo, hi)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point=None) -> torch.Tensor:
    return (q - zero_point) * scale if zero_point is not None else q * scale


# ---------------------------------------------------------------- weights


@dataclass
class QWeight:
    """An integer weight in torch layout [out, in] with blocked scales [out, in // group]."""

    q: torch.Tensor  # int8 holding 4- or 8-bit values
    scale: torch.Tensor  # fp32 [out, n_groups]
    zero_point: torch.Tensor | None  # uint8 [out, n_groups] (asymmetric) or None
    bits: int
    group_size: int

    def dequant(self) -> torch.Tensor:
        """fp32 [out, in]: codes times their group's scale (minus the zero point), per element."""
        out, k = self.q.shape
        q = self.q.float().view(out, k // self.group_size, self.group_size)
        s = self.scale.float()[:, :, None]
        if self.zero_point is not None:
            q = q - self.zero_point.float()[:, :, None]
        return (q * s).view(out, k)


FP32_EXACT = 2**24  # integers up to this are exact in fp32


def exact_scale_bits(in_features: int, w_bits: int, symmetric: bool, a_bits: int) -> int:
    """B such that in_features * max|q_a| * max|q_w - zp| * (2^B - 1) < 2^24 (at most 16).

    Raises ValueError when fewer than 2 bits remain (the layer is too wide for exact fp32 sums)."""
    amax = 2 ** (a_bits - 1)
    wmax = 2 ** (w_bits - 1) if symmetric else 2**w_bits - 1
    room = FP32_EXACT // (in_features * amax * wmax)
    b = min(16, room.bit_length() - 1) if room > 0 else 0
    if b < 2:
        raise ValueError(
            f"in-features {in_features} too wide for exact accumulation of {a_bits}-bit activations times "
            f"{w_bits}-bit weights (use weights.accumulation: float)"
        )
    return b


def grid_exponent(scale: torch.Tensor, scale_bits: int) -> torch.Tensor:
    """Per row of scale [out, n_groups]: the smallest e with max_g scale <= (2^B - 1) * 2^e."""
    top = scale.amax(dim=1, keepdim=True).double() / float(2**scale_bits - 1)
    return torch.ceil(torch.log2(top))


def snap_scales(scale: torch.Tensor, scale_bits: int, exponent: torch.Tensor | None = None) -> torch.Tensor:
    """Round group scales up to m * 2^e (m integer in [1, 2^B - 1], e per row, see the module doc).

    Rounding up never makes a min/max range saturate; `exponent` fixes e (GPTQ fixes it from the
    unquantized row, then a later group's m is clamped to 2^B - 1)."""
    e = grid_exponent(scale, scale_bits) if exponent is None else exponent
    unit = torch.exp2(e)
    m = torch.clamp(torch.ceil(scale.double() / unit), 1, 2**scale_bits - 1)
    return (m * unit).float()


def weight_scales(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int,
    scale_bits: int | None = None,
    exponent: torch.Tensor | None = None,
):
    """(scale, zero_point) per output row and input group for w [out, in].

    With `scale_bits`, the scales are snapped for exact accumulation (`snap_scales`)."""
    out, n = w.shape
    if n % group_size:
        raise ValueError(f"in-features {n} not divisible by group_size {group_size}")
    g = w.float().reshape(out, n // group_size, group_size)
    if symmetric:
        _, hi = qrange(bits, True)
        scale = torch.clamp(g.abs().amax(-1), min=EPS) / float(hi)
        if scale_bits is not None:
            scale = snap_scales(scale, scale_bits, exponent)
        return scale, None
    lo, hi = qrange(bits, False)
    mn = torch.clamp(g.amin(-1), max=0.0)
    mx = torch.clamp(g.amax(-1), min=0.0)
    scale = torch.clamp(mx - mn, min=EPS) / float(hi)
    if scale_bits is not None:
        scale = snap_scales(scale, scale_bits, exponent)
    zp = torch.clamp(torch.round(-mn / scale), lo, hi)
    return scale, zp


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int,
    scale=None,
    zero_point=None,
    scale_bits: int | None = None,
) -> QWeight:
    """Round-to-nearest with the given (or min/max, optionally snapped) scales; w [out, in]."""
    if scale is None:
        scale, zero_point = weight_scales(w, bits, symmetric, group_size, scale_bits)
    s = scale.repeat_interleave(group_size, dim=1)
    zp = None if zero_point is None else zero_point.repeat_interleave(group_size, dim=1)
    q = quantize(w.float(), s, zp, bits, symmetric)
    return QWeight(
        q=q.to(torch.int8 if symmetric else torch.uint8),
        scale=scale.float(),
        zero_point=None if zero_point is None else zero_point.to(torch.uint8),
        bits=bits,
        group_size=group_size,
    )
