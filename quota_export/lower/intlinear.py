"""Integer GEMMs for the exact quantized linears of the `onnx` target (`export.matmul: integer`).

With exact accumulation (quant/quantizers.py) a quantized linear is

    y = s_tok * sum_k a_k W'_kn,   W'_kn = w_kn * s_{g(k),n},   s_gn = m_gn * 2^e_n  (m integer)

(w the weight codes, minus the zero point if asymmetric) and every fp32 partial sum of the float path
is exact, so y = s_tok * (2^e_n * sum_g m_gn I_gn), I_gn = sum_{k in g} a_k w_kn. Here the integers
come from ONNX Runtime's u8 x s8 `MatMulInteger` (activation codes + zero point as uint8, weights int8)
and are scaled in float only where the product is exact, so the result is the float path's, bit for bit:

    per channel (one group):  Cast(I) * s_n      (|I m| < 2^24 2^e: exact)          then * s_tok
    per group:  m_gn = sum_j d_jgn 2^(b j) (digits d < 2^b); plane j's weight w_kn d_j,g(k),n (int8);
                one MatMulInteger over the P planes side by side along N, then
                ReduceSum_j Cast(I_j) * 2^(b j + e_n)   (each partial sum a multiple of 2^e_n below
                2^24 2^e_n, as in the float path: exact in any order)              then * s_tok

The graph stores the 4-bit codes (INT4/UINT4, as the float form) and the digits (uint8); the int8
planes are a constant subgraph (Cast, Mul, Reshape, Transpose) that ONNX Runtime folds once when the
session is created. The digit width b is the largest with |w| (2^b - 1) <= 127 (int8) for which the
u8 x s8 kernel cannot saturate: x86 CPUs without VNNI add pairs of u8 x s8 products in int16
(vpmaddubsw), so 2 * max(u8 code) * max|plane| must stay below 2^15 (measured on an AVX2 machine:
255 x 127 in every position sums to 32767 per pair). When nothing fits (8-bit weights times 8-bit
activations) `plan` returns None and the linear keeps the float form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from quota_export.lower.graph import FLOAT, INT8, Graph
from quota_export.quant.quantizers import QWeight

INT32 = TensorProto.INT32
INT16_PAIR = 2**15 - 1  # vpmaddubsw: two u8 x s8 products added in int16 (saturating)


def code_range(a_bits: int) -> tuple[int, int]:
    """(zero point, largest uint8 code) of the activation codes: signed code + zero point."""
    zp = 2 ** (a_bits - 1)
    return zp, 2 * zp - 1


@dataclass
class Plan:
    """How a weight becomes int8 planes: W'^T = sum_j (w * digits_j) * factors_j."""

    digits: np.ndarray | None  # uint8 [P, G, out] (None: per channel, one plane of the codes)
    factors: np.ndarray  # fp32 [P, out]: 2^(b j + e_n), or the channel scales

    @property
    def planes(self) -> int:
        return self.factors.shape[0]


def row_exponent(scale: np.ndarray) -> np.ndarray:
    """Per row of scale [out, G] (positive fp32): the largest e with every scale / 2^e an integer."""
    m, e = np.frexp(scale.astype(np.float64))  # scale = m 2^e, m in [0.5, 1), 24 significant bits
    mant = (m * 2.0**24).astype(np.int64)
    low = mant & -mant  # lowest set bit
    return (e - 24 + np.log2(low).astype(np.int64)).min(axis=1)


def signed_codes(qw: QWeight) -> np.ndarray:
    """The weight codes minus the zero point, int64 [out, in]."""
    q = qw.q.numpy().astype(np.int64)
    if qw.zero_point is None:
        return q
    return q - np.repeat(qw.zero_point.numpy().astype(np.int64), qw.group_size, axis=1)


def plan(qw: QWeight, a_bits: int) -> Plan | None:
    """The exact integer form of this weight, or None (see the module doc)."""
    w = signed_codes(qw)
    out, k = w.shape
    wmax = int(np.abs(w).max(initial=1))
    _, umax = code_range(a_bits)
    scale = qw.scale.numpy()
    if qw.group_size == k:  # one scale per output channel: one GEMM over the codes
        if wmax > 127 or 2 * umax * wmax > INT16_PAIR:
            return None
        return Plan(None, scale.T.astype(np.float32))
    fits = [b for b in range(1, 5) if wmax * (2**b - 1) <= 127 and 2 * umax * wmax * (2**b - 1) <= INT16_PAIR]
    if not fits:
        return None
    b = fits[-1]
    e = row_exponent(scale)  # [out]
    m = (scale.astype(np.float64) / np.exp2(e)[:, None]).astype(np.int64)  # [out, G], exact integers
    P = max(1, -(-int(m.max()).bit_length() // b))
    digits = np.stack([((m >> (b * j)) & (2**b - 1)).T for j in range(P)]).astype(np.uint8)  # [P, G, out]
    factors = np.stack([np.exp2(e + b * j) for j in range(P)]).astype(np.float32)
    return Plan(digits, factors)


def planes_array(qw: QWeight, p: Plan) -> np.ndarray:
    """int8 [in, P*out]: the planes side by side (what `int_weight`'s constant subgraph computes)."""
    w = signed_codes(qw).T  # [in, out]
    if p.digits is None:
        return w.astype(np.int8)
    d = np.repeat(p.digits.astype(np.int64), qw.group_size, axis=1)  # [P, in, out]
    return np.concatenate(list(w[None] * d), axis=1).astype(np.int8)


def int_weight(g: Graph, qw: QWeight, p: Plan) -> str:
    """The MatMulInteger B operand int8 [in, P*out] from the stored 4-bit codes (a constant subgraph)."""
    out, k = qw.q.shape
    signed = qw.zero_point is None
    codes = qw.q.numpy().T  # [in, out]
    if qw.bits == 4:
        wq = g.init_int4("weight_q", codes, signed=signed)
    else:
        wq = g.init("weight_q", codes.astype(np.int8 if signed else np.uint8))
    if p.digits is None and signed:
        return g.op("Cast", [wq], to=INT8, name="weight_int8")
    G = k // qw.group_size
    w = g.op("Reshape", [g.op("Cast", [wq], to=INT32), g.const([G, qw.group_size, out], np.int64)])
    if not signed:
        zp = g.op("Cast", [g.init("zero_point", qw.zero_point.numpy().T[:, None, :].copy())], to=INT32)
        w = g.op("Sub", [w, zp])
    if p.digits is None:
        return g.op("Cast", [g.op("Reshape", [w, g.const([k, out], np.int64)])], to=INT8, name="weight_int8")
    d = g.op("Cast", [g.init("scale_digits", p.digits[:, :, None, :].copy())], to=INT32)  # [P, G, 1, out]
    planes = g.op("Reshape", [g.op("Mul", [w, d]), g.const([p.planes, k, out], np.int64)])
    planes = g.op("Reshape", [g.op("Transpose", [planes], perm=[1, 0, 2]), g.const([k, p.planes * out], np.int64)])
    return g.op("Cast", [planes], to=INT8, name="weight_planes")


def act_codes(g: Graph, x: str, s: str, a_bits: int) -> str:
    """x fp32 [..., K], per-token scale s [..., 1] -> uint8 codes round(x / s) + zero point.

    Div is IEEE division, as torch's x / s in `quantize`; QuantizeLinear with scale 1 then rounds half
    to even and adds the zero point. |x| <= amax and s = amax / qmax keep |round(x / s)| <= qmax, so
    the codes need no saturation, as the reference's clamp to [-qmax - 1, qmax] never acts."""
    zp, _ = code_range(a_bits)
    xs = g.op("Div", [x, s], name="Div")
    return g.op("QuantizeLinear", [xs, g.const(1.0), g.const(zp, np.uint8)], name="Codes")


def integer_matmul(g: Graph, codes: str, qw: QWeight, a_bits: int, p: Plan) -> str:
    """uint8 codes [1, T, K] -> (codes - zp) @ W' as fp32 [1, T, N], exactly; the caller multiplies s_tok."""
    zp, _ = code_range(a_bits)
    out = qw.q.shape[0]
    y = g.op("Cast", [g.op("MatMulInteger", [codes, int_weight(g, qw, p), g.const(zp, np.uint8)])], to=FLOAT)
    if p.planes == 1:
        return g.op("Mul", [y, g.init("weight_scale", p.factors.reshape(-1))], name="WeightScale")
    y = g.op("Reshape", [y, g.const([0, 0, p.planes, out], np.int64)])
    y = g.op("Mul", [y, g.init("plane_scale", p.factors)], name="PlaneScale")
    return g.op("ReduceSum", [y, g.const([2], np.int64)], keepdims=0, name="SumPlanes")
