"""Rotary position embedding, 1-D RoPE or M-RoPE (Qwen2-VL's position planes).

    angles = pos * inv_freq (in hp; with planes, frequency f reads plane planes[f])
    x' = x * cos + rotate_half(x) * sin,  cos/sin = [angles, angles] rounded to fp32
    torch: rope_freqs / rope          ONNX: rope_tables_onnx (once per position input) / rope_onnx
The ONNX tables carry the sign of rotate_half: sin' = [-sin, sin], so rope_onnx needs no Neg per
use ((-a) * b = a * (-b) exactly).
"""

from __future__ import annotations

import numpy as np
import torch

from quota_export.ops.base import Emit
from quota_export.ops.graph import DOUBLE, FLOAT


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_freqs(pos, inv_freq, planes, hp):
    """pos [1,T] (1-D RoPE) or [P,1,T] (M-RoPE planes) -> angles [1,T,d/2] in hp."""
    inv = inv_freq.to(hp)
    if pos.dim() == 3:
        sel = pos[planes]  # [d/2, 1, T]
        return sel.permute(1, 2, 0).to(hp) * inv
    return pos[..., None].to(hp) * inv


def rope(x, pos, inv_freq, planes, hp):
    """x [1,H,T,d] rotated by the positions pos."""
    freqs = rope_freqs(pos, inv_freq, planes, hp)  # [1, T, d/2] in hp
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().float()[:, None], emb.sin().float()[:, None]  # [1, 1, T, d]
    return x * cos + rotate_half(x) * sin


def rope_tables_onnx(e: Emit, pos, inv_freq: np.ndarray, planes: np.ndarray | None, name: str):
    """position_ids [1,T] (or planes [P,1,T]) -> cos, sin' [1,1,T,d] (sin' = [-sin, sin], see above)"""
    with e.scope(name):
        p = e.op("Cast", [pos], to=DOUBLE if e.fp64 else FLOAT)
        if planes is not None:
            # M-RoPE: [P,1,T] -> frequency f reads plane planes[f] -> [1,T,d/2]
            sel = e.op("Gather", [p, e.init("planes", planes.astype(np.int64))], axis=0)
            p = e.op("Transpose", [sel], perm=[1, 2, 0])
        else:
            p = e.op("Unsqueeze", [p, e.ax([-1])])
        f = e.op("Mul", [p, e.init("inv_freq", e.hconst(inv_freq))])
        a = e.op("Concat", [f, f], axis=-1)
        cos = e.op("Unsqueeze", [e.to_f(e.op("Cos", [a])), e.ax([1])], name="cos")
        sin = e.to_f(e.op("Sin", [a]))
        sign = e.const(np.repeat([-1.0, 1.0], len(inv_freq)).astype(np.float32), np.float32)
        sin = e.op("Unsqueeze", [e.op("Mul", [sin, sign]), e.ax([1])], name="sin")
        return cos, sin


def rope_onnx(e: Emit, x, cos, sin, head_dim: int, name: str):
    """x * cos + rotate_half(x) * sin = x * cos + [x2, x1] * sin'  (tables from rope_tables_onnx)"""
    h = head_dim // 2
    with e.scope(name):
        x1, x2 = e.op("Split", [x, e.const([h, h], np.int64)], axis=-1, n_out=2)
        rot = e.op("Concat", [x2, x1], axis=-1)
        return e.op("Add", [e.op("Mul", [x, cos]), e.op("Mul", [rot, sin])])
