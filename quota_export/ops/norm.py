"""RMSNorm: w * (x * r), r = 1 / sqrt(mean(x^2) + eps), the statistic in the reductions' precision.

    torch: rmsnorm(x, w, eps, hp)            ONNX: rmsnorm_onnx(e, x, w, eps, name)
    x ─ Cast(hp) ─ Mul(x,x) ─ ReduceMean(-1) ─ Add(eps) ─ Sqrt ─ Reciprocal ─ Cast(f32) = r
    x ─ Mul(r) ─ Mul(w)
"""

from __future__ import annotations

import numpy as np
import torch

from quota_export.ops.base import Emit


def rmsnorm(x, weight, eps, hp=torch.float32):
    """weight * (x * r), r = 1 / sqrt(mean(x^2) + eps) computed in `hp` and rounded to fp32."""
    xh = x.to(hp)
    r = 1.0 / torch.sqrt((xh * xh).mean(-1, keepdim=True) + eps)
    return weight * (x * r.float())


def rmsnorm_onnx(e: Emit, x, w: np.ndarray, eps: float, name: str):
    with e.scope(name):
        xh = e.to_hp(x)
        sq = e.op("Mul", [xh, xh], name="Pow")
        v = e.op("ReduceMean", [sq, e.ax([-1])], keepdims=1)
        r = e.op("Sqrt", [e.op("Add", [v, e.hc(eps)])])
        r = e.to_f(e.op("Reciprocal", [r]))
        y = e.op("Mul", [x, r])
        return e.op("Mul", [e.init("weight", w.astype(np.float32)), y], name="MulWeight")
