"""The gated MLP activation: a = silu(gate) * up, silu in the reductions' precision, rounded to fp32.

    torch: swiglu(gate, up, hp)        ONNX: swiglu_onnx(e, gate, up, scope)
    gate ─ Cast(hp) ─┬─ Sigmoid ─ Mul ─ Cast(f32) ─ Mul(up)
                     └───────────────┘
"""

from __future__ import annotations

import torch

from quota_export.ops.base import Emit


def swiglu(gate, up, hp):
    gh = gate.to(hp)
    return (gh * torch.sigmoid(gh)).float() * up


def swiglu_onnx(e: Emit, gate, up, scope: str):
    with e.scope(scope):
        gh = e.to_hp(gate)
        return e.op("Mul", [e.to_f(e.op("Mul", [gh, e.op("Sigmoid", [gh])], name="silu")), up], name="act")
