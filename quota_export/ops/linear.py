"""The quantized linear: (integer activations @ W') * s_token (+ bias), W' = DQ(int4/int8 codes).

    torch: linear_input(x, a_bits, quantized) -> (q, s) | (x, None);  linear((q, s), W', b)
    ONNX:  weight_onnx(e, qw | W, scope)  [in, out];  linear_onnx(e, x_in, w, s, b, scope)

        q [.., in] (integers as f32) ─ MatMul(DequantizeLinear(codes, scales, block)) ─ Mul(s) ─ Add(b)

With snapped weight scales the product and every partial sum are exact in fp32 (quant/quantizers.py,
"Exact accumulation"), so torch and ONNX Runtime agree bit for bit however the sum is ordered.
ONNX Runtime fuses DQ(int4 W) + MatMul into its 4-bit MatMul (weight-only int4 kernel).
"""

from __future__ import annotations

import numpy as np

from quota_export.ops.act_quant import quant_act
from quota_export.ops.base import Emit
from quota_export.quant.quantizers import QWeight


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
