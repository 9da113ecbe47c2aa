"""The gated MLP activation: a = silu(gate) * up, silu in the reductions' precision, rounded to fp32.

    torch: swiglu(gate, up, hp)        ONNX: swiglu_onnx(e, gate, up, scope)
    gate ─ Cast(hp) ─┬─ Neg ─ Exp ─ Add(1) ─ Reciprocal ─ Mul ─ Cast(f32) ─ Mul(up)
                     └───────────────────────────────────┘
The sigmoid is spelled 1 / (1 + exp(-x)), torch's own form, in hp: ONNX Runtime's fp64 Exp is
faster than its fp64 Sigmoid (measured, docs/numerics.md).
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
        sig = e.op("Reciprocal", [e.op("Add", [e.op("Exp", [e.op("Neg", [gh])]), e.hc(1.0)])], name="Sigmoid")
        return e.op("Mul", [e.to_f(e.op("Mul", [gh, sig], name="silu")), up], name="act")
