"""The quantized linear: (integer activations @ W') * s_token (+ bias), W' = DQ(int4/int8 codes).

    torch: linear_input(x, a_bits, quantized) -> (q, s) | (x, None);  linear((q, s), W', b)
    ONNX:  weight_onnx(e, qw | W, scope)  [in, out];  linear_onnx(e, x_in, w, s, b, scope)

        q [.., in] (integers as f32) ─ MatMul(DequantizeLinear(codes, scales, block)) ─ Mul(s) ─ Add(b)

With snapped weight scales the product and every partial sum are exact in fp32 (quant/quantizers.py,
"Exact accumulation"), so torch and ONNX Runtime agree bit for bit however the sum is ordered.
ONNX Runtime fuses DQ(int4 W) + MatMul into its 4-bit MatMul (weight-only int4 kernel).

Integer form (`export.matmul: integer`, onnx target): integer_plan(qw, a_bits), then
integer_linear_onnx(e, codes, qw, plan, s, b, scope) on uint8 codes (act_quant_onnx(uint8=True)).
With s_gn = m_gn 2^e_n (m integer, one e per row) the float path's sum is exact, so it equals
2^e_n sum_g m_gn I_gn with I_gn = sum_{k in g} a_k w_kn (w: the codes, minus the zero point).
ONNX Runtime's u8 x s8 MatMulInteger computes the integers, and float multiplies only where
the product is exact, so the result is the float form's, bit for bit:

    per channel:  codes ─ MatMulInteger(int8 w, zp) ─ Cast ─ Mul(s_n) ─ Mul(s_tok) ─ Add(b)
    per group:    m_gn = sum_j d_jgn 2^(bj) (digits < 2^b); plane j = w_kn d_j,g(k),n (int8); one
                  MatMulInteger over the P planes side by side [in, P*out] ─ Cast ─ Reshape
                  [.., P, out] ─ Mul(2^(bj + e_n)) ─ ReduceSum(planes) ─ Mul(s_tok) ─ Add(b)
                  (every partial sum a multiple of 2^e_n below 2^24 2^e_n, as in the float path)

The graph stores the 4-bit codes and the digits (uint8); the int8 planes are a constant subgraph
that ONNX Runtime folds once at session creation. b is the largest digit width with |w| (2^b - 1)
<= 127 for which the u8 x s8 kernel cannot saturate: x86 CPUs without VNNI add pairs of u8 x s8
products in int16 (vpmaddubsw; measured: 255 x 127 everywhere gives 32767 per pair), so
2 max(code) max|plane| < 2^15. Where nothing fits (8-bit weights x 8-bit activations) the plan is
None and the linear keeps the float form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from quota_export.ops.act_quant import code_zero_point, quant_act
from quota_export.ops.base import Emit
from quota_export.ops.graph import FLOAT, INT8
from quota_export.quant.quantizers import QWeight

INT16_PAIR = 2**15 - 1  # vpmaddubsw: two u8 x s8 products added in int16 (saturating)


def linear_input(x, a_bits: int, quantized: bool):
    """The input of a linear: (integers, per-token scale) if its activations are quantized, else (x, None)."""
    if a_bits < 16 and quantized:
        return quant_act(x, a_bits)
    return x, None


def linear(xs, weight, bias=None):
    """(q @ W^T) * s (+ bias) for `xs` = (q, s) from `linear_input`: the order the graphs compute it in."""
    x, s = xs
    y = x @ weight.T
    if s is not None:
        y = y * s
    return y if bias is None else y + bias


def weight_onnx(e: Emit, qw: QWeight | None, w_fp, scope: str):
    """The MatMul B operand [in, out]: DQ(int4/int8 blocked constant) or an fp32 constant."""
    with e.scope(scope):
        if qw is None:
            return e.init("weight", w_fp.T.numpy().astype(np.float32))
        q = qw.q.numpy().T  # [in, out]
        sc = e.init("scale", qw.scale.numpy().T.astype(np.float32))  # [in/g, out]
        if qw.zero_point is None:
            qi = e.g.init_int4("weight_q", q) if qw.bits == 4 else e.init("weight_q", q.astype(np.int8))
            ins = [qi, sc]
        elif qw.bits == 4:
            full = e.g.init_int4("weight_q", q, signed=False)
            zfull = e.g.init_int4("zero_point", qw.zero_point.numpy().T, signed=False)
            ins = [full, sc, zfull]
        else:
            ins = [e.init("weight_q", q.astype(np.uint8)), sc, e.init("zero_point", qw.zero_point.numpy().T.astype(np.uint8))]
        return e.op("DequantizeLinear", ins, axis=0, block_size=qw.group_size)


def linear_onnx(e: Emit, x_in, w, scale, bias, scope: str):
    """MatMul(x_in, w) (* scale: the activations' per-token scale, None if unquantized) (+ bias)."""
    with e.scope(scope):
        y = e.op("MatMul", [x_in, w])
        if scale is not None:
            y = e.op("Mul", [y, scale], name="ActScale")
        return y if bias is None else e.op("Add", [y, e.init("bias", bias.numpy().astype(np.float32))], name="Bias")


# ---------------------------------------------------------------- integer form (export.matmul: integer)


@dataclass
class IntegerPlan:
    """W'^T = sum_j (w * digits_j) * factors_j: the int8 planes' digits and their float factors."""

    digits: np.ndarray | None  # uint8 [P, G, out]; None: per channel, one plane of the codes
    factors: np.ndarray  # fp32 [P, out]: 2^(b j + e_n), or the channel scales

    @property
    def planes(self) -> int:
        return self.factors.shape[0]


def _signed_codes(qw: QWeight) -> np.ndarray:
    q = qw.q.numpy().astype(np.int64)
    if qw.zero_point is None:
        return q
    return q - np.repeat(qw.zero_point.numpy().astype(np.int64), qw.group_size, axis=1)


def row_exponent(scale: np.ndarray) -> np.ndarray:
    """Per row of scale [out, G] (positive fp32): the largest e with every scale / 2^e an integer."""
    m, e = np.frexp(scale.astype(np.float64))  # m in [0.5, 1) with 24 significant bits
    mant = (m * 2.0**24).astype(np.int64)
    return (e - 24 + np.log2(mant & -mant).astype(np.int64)).min(axis=1)


def integer_plan(qw: QWeight, a_bits: int) -> IntegerPlan | None:
    """The exact integer form of this weight for `a_bits` activation codes, or None (module doc)."""
    w = _signed_codes(qw)
    k = w.shape[1]
    wmax = int(np.abs(w).max(initial=1))
    umax = 2 * code_zero_point(a_bits) - 1
    scale = qw.scale.numpy()
    if qw.group_size == k:
        ok = wmax <= 127 and 2 * umax * wmax <= INT16_PAIR
        return IntegerPlan(None, scale.T.astype(np.float32)) if ok else None
    fits = [b for b in range(1, 5) if wmax * (2**b - 1) <= 127 and 2 * umax * wmax * (2**b - 1) <= INT16_PAIR]
    if not fits:
        return None
    b = fits[-1]
    e = row_exponent(scale)
    m = (scale.astype(np.float64) / np.exp2(e)[:, None]).astype(np.int64)  # [out, G], exact integers
    P = max(1, -(-int(m.max()).bit_length() // b))
    digits = np.stack([((m >> (b * j)) & (2**b - 1)).T for j in range(P)]).astype(np.uint8)  # [P, G, out]
    return IntegerPlan(digits, np.stack([np.exp2(e + b * j) for j in range(P)]).astype(np.float32))


def integer_planes(qw: QWeight, plan: IntegerPlan) -> np.ndarray:
    """int8 [in, P*out]: the planes side by side (what `integer_linear_onnx`'s constant subgraph folds to)."""
    w = _signed_codes(qw).T
    if plan.digits is None:
        return w.astype(np.int8)
    d = np.repeat(plan.digits.astype(np.int64), qw.group_size, axis=1)  # [P, in, out]
    return np.concatenate(list(w[None] * d), axis=1).astype(np.int8)


def _planes_onnx(e: Emit, qw: QWeight, plan: IntegerPlan):
    """The MatMulInteger B operand int8 [in, P*out] from the stored codes (a constant subgraph)."""
    out, k = qw.q.shape
    signed = qw.zero_point is None
    codes = qw.q.numpy().T
    if qw.bits == 4:
        wq = e.g.init_int4("weight_q", codes, signed=signed)
    else:
        wq = e.init("weight_q", codes.astype(np.int8 if signed else np.uint8))
    if plan.digits is None and signed:
        return e.op("Cast", [wq], to=INT8, name="weight_int8")
    G = k // qw.group_size
    w = e.op("Reshape", [e.op("Cast", [wq], to=TensorProto.INT32), e.const([G, qw.group_size, out], np.int64)])
    if not signed:
        zp = e.init("zero_point", qw.zero_point.numpy().T[:, None, :].copy())
        w = e.op("Sub", [w, e.op("Cast", [zp], to=TensorProto.INT32)])
    if plan.digits is None:
        return e.op("Cast", [e.op("Reshape", [w, e.const([k, out], np.int64)])], to=INT8, name="weight_int8")
    d = e.op("Cast", [e.init("scale_digits", plan.digits[:, :, None, :].copy())], to=TensorProto.INT32)
    planes = e.op("Reshape", [e.op("Mul", [w, d]), e.const([plan.planes, k, out], np.int64)])
    planes = e.op("Transpose", [planes], perm=[1, 0, 2])
    return e.op("Cast", [e.op("Reshape", [planes, e.const([k, plan.planes * out], np.int64)])], to=INT8,
                name="weight_planes")


def integer_linear_onnx(e: Emit, codes, qw: QWeight, plan: IntegerPlan, a_bits: int, scale, bias, scope: str):
    """uint8 codes [1, T, in] -> ((codes - zp) @ W') * scale (+ bias), the float form's bits."""
    out = qw.q.shape[0]
    with e.scope(scope):
        zp = e.const(code_zero_point(a_bits), np.uint8)
        y = e.op("Cast", [e.op("MatMulInteger", [codes, _planes_onnx(e, qw, plan), zp])], to=FLOAT)
        if plan.planes == 1:
            y = e.op("Mul", [y, e.init("weight_scale", plan.factors.reshape(-1))], name="WeightScale")
        else:
            y = e.op("Reshape", [y, e.const([0, 0, plan.planes, out], np.int64)])
            y = e.op("Mul", [y, e.init("plane_scale", plan.factors)], name="PlaneScale")
            y = e.op("ReduceSum", [y, e.ax([2])], keepdims=0, name="SumPlanes")
        y = e.op("Mul", [y, scale], name="ActScale")
        return y if bias is None else e.op("Add", [y, e.init("bias", bias.numpy().astype(np.float32))], name="Bias")
