"""Per-token dynamic symmetric activation quantization (4 or 8 bits), scale computed in the graph.

    s = max(max|x|, EPS) / qmax per token;  q = saturate(round_half_even(x / s))
    torch: quant_act(x, bits) -> (q as float, s)     ONNX: act_quant_onnx(e, x, bits, dim, name)

The quantized linear (ops/linear.py) multiplies the integers q and applies s after the sum,
(q @ W) * s, so the sum is exact (see quant/quantizers.py, "Exact accumulation").

    onnx target:      x ─ Abs ─ ReduceMax(-1) ─ Max(EPS) ─ Div(qmax) = s
                      QuantizeLinear(x, s, block = dim, int4|int8) ─ Cast(f32) = q
                      uint8=True (the integer linear, ops/linear.py): Div(x, s) ─ QuantizeLinear(1,
                      zero point 2^(bits-1)) = q + zp as uint8 (|x| <= max|x| keeps |q| <= qmax: no
                      saturation, as the clamp to [-qmax-1, qmax] never acts)
    tensorrt target:  the same s; q = Clip(Round(x / s), -qmax-1, qmax) in float (TensorRT has
                      no INT4 activations and wants constant Q/DQ scales), exact to the Q/DQ pair
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from quota_export.ops.base import Emit
from quota_export.ops.graph import FLOAT
from quota_export.quant.quantizers import EPS, dequantize, qrange, quantize


def act_scale_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token scale: max(|x|, EPS) / qmax over the last axis (keepdim)."""
    _, hi = qrange(bits, True)
    amax = x.abs().amax(dim=-1, keepdim=True)
    return torch.clamp(amax, min=EPS) / float(hi)


def quant_act(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activation quantization: (integers as float, scale [..., 1])."""
    s = act_scale_per_token(x, bits)
    return quantize(x, s, None, bits, True), s


def fake_quant_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize activations per token."""
    q, s = quant_act(x, bits)
    return dequantize(q, s)


def code_zero_point(bits: int) -> int:
    """The zero point of the uint8 activation codes: q + 2^(bits-1) lies in [1, 2^bits - 1]."""
    return 2 ** (bits - 1)


def act_quant_onnx(e: Emit, x, bits: int, dim: int, name: str, uint8: bool = False):
    """-> (q, s): the integers as float (or, `uint8`, as uint8 codes q + code_zero_point) and the
    per-token scale."""
    qmax = 2 ** (bits - 1) - 1
    with e.scope(name):
        a = e.op("Abs", [x])
        m = e.op("ReduceMax", [a, e.ax([-1])], keepdims=1)
        m = e.op("Max", [m, e.const(EPS)])
        s = e.op("Div", [m, e.const(float(qmax))], name="Scale")
        if uint8:
            xs = e.op("Div", [x, s])
            return e.op("QuantizeLinear", [xs, e.const(1.0), e.const(code_zero_point(bits), np.uint8)], name="Codes"), s
        if e.target == "tensorrt":
            q = e.op("Round", [e.op("Div", [x, s])])
            return e.op("Clip", [q, e.const(float(-qmax - 1)), e.const(float(qmax))], name="Saturate"), s
        dt = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
        q = e.op("QuantizeLinear", [x, s], axis=-1, block_size=dim, output_dtype=dt)
        # Cast, not DequantizeLinear(q, 1): ONNX Runtime fuses DQ(int4 W) + MatMul into its 4-bit
        # MatMul only when the weight is the MatMul's single DQ input
        return e.op("Cast", [q], to=FLOAT, name="Integers"), s
