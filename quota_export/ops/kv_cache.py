"""KV-cache quantization and its boundary format: asymmetric, per token, groups of g along head_dim.

    scale = max(max(x) - min(x), EPS) / qmax (range always includes 0), zp = clip(round(-min/scale))
    q = clip(round(x / scale) + zp, 0, qmax);  x' = (q - zp) * scale
    torch: kv_quantize / kv_dequantize / kv_fake       ONNX: kv_quant_onnx / kv_dequant_onnx

At a graph boundary (prefill's present.*, decode's past.* / present.*) a layer's keys or values are
    q uint8 [1,kvh,T,d] (8-bit) or [1,kvh,T,d/2] (4-bit, two per byte: even | odd << 4),
    scale fp32 [1,kvh,T,d/g], zero uint8 [1,kvh,T,d/g];  fp32 [1,kvh,T,d] when unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quota_export.ops.base import Emit
from quota_export.ops.graph import FLOAT, UINT8
from quota_export.quant.quantizers import EPS, qrange, quantize


def kv_params(x: torch.Tensor, bits: int, group_size: int):
    """Asymmetric per-token scales over groups of the last axis: x [..., d] -> [..., d/g] each."""
    *lead, d = x.shape
    if d % group_size:
        raise ValueError(f"head_dim {d} not divisible by kv group_size {group_size}")
    _, hi = qrange(bits, False)
    g = x.reshape(*lead, d // group_size, group_size)
    # The range must contain 0: the zero point is an integer in [0, 2^bits - 1], so a group
    # entirely above (below) zero would otherwise saturate to a single level.
    mn = torch.clamp(g.amin(-1), max=0.0)
    mx = torch.clamp(g.amax(-1), min=0.0)
    scale = torch.clamp(mx - mn, min=EPS) / float(hi)
    zp = torch.clamp(torch.round(-mn / scale), 0, hi)
    return scale, zp


def kv_quantize(x: torch.Tensor, bits: int, group_size: int):
    """x [..., d] -> (q uint8 [..., d], scale fp32 [..., d/g], zero_point uint8 [..., d/g])."""
    scale, zp = kv_params(x, bits, group_size)
    s = scale.repeat_interleave(group_size, dim=-1)
    z = zp.repeat_interleave(group_size, dim=-1)
    q = quantize(x, s, z, bits, False)
    return q.to(torch.uint8), scale, zp.to(torch.uint8)


def kv_dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, group_size: int) -> torch.Tensor:
    s = scale.repeat_interleave(group_size, dim=-1)
    z = zp.float().repeat_interleave(group_size, dim=-1)
    return (q.float() - z) * s


def kv_fake(x: torch.Tensor, bits: int, group_size: int | None):
    """The cache's view of keys or values [1,kvh,T,d]: (x', (q, scale, zp) | None); x itself when
    bits >= 16. group_size None = head_dim."""
    if bits >= 16:
        return x, None
    g = group_size or x.shape[-1]
    q, s, z = kv_quantize(x, bits, g)
    return kv_dequantize(q, s, z, g), (q, s, z)


@dataclass
class KVNames:
    """Names of one layer's cache tensors (key or value) in a graph (scale/zero None: unquantized)."""

    q: str
    scale: str | None = None
    zero: str | None = None


@dataclass(frozen=True)
class KVLayout:
    """What the ONNX forms need to know of a cache: bits, group, heads and head_dim."""

    bits: int
    group: int | None  # None = head_dim
    kv_heads: int
    head_dim: int

    @property
    def g(self) -> int:
        return self.group or self.head_dim

    def shape(self, seq):
        return [1, self.kv_heads, seq, self.head_dim]


def kv_quant_onnx(e: Emit, x, kv: KVLayout, name: str):
    """x [1,kvh,T,d] -> (x dequantized, KVNames at the boundary width)."""
    d, gs, h = kv.head_dim, kv.g, kv.kv_heads
    qmax = float(2**kv.bits - 1)
    with e.scope(name):
        xg = e.op("Reshape", [x, e.const([1, h, -1, d // gs, gs], np.int64)])
        # the range always includes 0 (as kv_params), so the zero point fits
        mn = e.op("Min", [e.op("ReduceMin", [xg, e.ax([-1])], keepdims=1), e.const(0.0)])
        mx = e.op("Max", [e.op("ReduceMax", [xg, e.ax([-1])], keepdims=1), e.const(0.0)])
        s = e.op("Div", [e.op("Max", [e.op("Sub", [mx, mn]), e.const(EPS)]), e.const(qmax)], name="Scale")
        z = e.op("Round", [e.op("Div", [e.op("Neg", [mn]), s])])
        z = e.op("Clip", [z, e.const(0.0), e.const(qmax)], name="ZeroPoint")
        q = e.op("Add", [e.op("Round", [e.op("Div", [xg, s])]), z])
        q = e.op("Clip", [q, e.const(0.0), e.const(qmax)], name="Quant")
        deq = e.op("Mul", [e.op("Sub", [q, z]), s], name="Dequant")
        deq = e.op("Reshape", [deq, e.const([1, h, -1, d], np.int64)])
        q = e.op("Reshape", [q, e.const([1, h, -1, d], np.int64)])
        qu8 = e.op("Cast", [pack4_onnx(e, q, kv) if kv.bits == 4 else q], to=UINT8)
        s_out = e.op("Squeeze", [s, e.ax([-1])], name="ScaleOut")
        z_out = e.op("Cast", [e.op("Squeeze", [z, e.ax([-1])])], to=UINT8, name="ZeroOut")
        return deq, KVNames(qu8, s_out, z_out)


def pack4_onnx(e: Emit, q, kv: KVLayout):
    """fp32 [...,d] holding the integers 0..15 -> fp32 [...,d/2] holding even + 16 odd (0..255), the
    byte a Cast to uint8 stores. One MatMul with [[1], [16]]: exact (integers below 2^8), and
    several times faster on ONNX Runtime than the same Split/Mul/Add on uint8 (measured, docs/numerics.md)."""
    with e.scope("pack4"):
        r = e.op("Reshape", [q, e.const([1, kv.kv_heads, -1, kv.head_dim // 2, 2], np.int64)])
        p = e.op("MatMul", [r, e.const([[1.0], [16.0]])])
        return e.op("Reshape", [p, e.const([1, kv.kv_heads, -1, kv.head_dim // 2], np.int64)])


def unpack4_onnx(e: Emit, p, kv: KVLayout):
    """uint8 [...,d/2] -> fp32 [...,d] holding the integers 0..15: hi = floor(p / 16), lo = p - 16 hi,
    in fp32 (every step exact on integers below 2^8; faster than uint8 Div/Mul/Sub on ONNX Runtime)."""
    with e.scope("unpack4"):
        f = e.op("Cast", [p], to=FLOAT)
        hi = e.op("Floor", [e.op("Mul", [f, e.const(1.0 / 16.0)])])
        lo = e.op("Sub", [f, e.op("Mul", [hi, e.const(16.0)])])
        st = e.op("Concat", [e.op("Unsqueeze", [lo, e.ax([-1])]), e.op("Unsqueeze", [hi, e.ax([-1])])], axis=-1)
        return e.op("Reshape", [st, e.const([1, kv.kv_heads, -1, kv.head_dim], np.int64)])


def kv_dequant_onnx(e: Emit, names: KVNames, kv: KVLayout, name: str):
    """boundary cache tensors -> fp32 [1,kvh,T,d] (exactly (q - z) * s)."""
    d, gs, h = kv.head_dim, kv.g, kv.kv_heads
    with e.scope(name):
        q = e.op("Cast", [names.q], to=FLOAT) if kv.bits == 8 else unpack4_onnx(e, names.q, kv)
        qf = e.op("Reshape", [q, e.const([1, h, -1, d // gs, gs], np.int64)])
        z = e.op("Unsqueeze", [e.op("Cast", [names.zero], to=FLOAT), e.ax([-1])])
        s = e.op("Unsqueeze", [names.scale, e.ax([-1])])
        x = e.op("Mul", [e.op("Sub", [qf, z]), s])
        return e.op("Reshape", [x, e.const([1, h, -1, d], np.int64)])


def boundary_specs(kv: KVLayout, seq) -> list[tuple[str, int, list]]:
    """(suffix, dtype, shape) of a layer's key or value tensors at a graph boundary."""
    if kv.bits >= 16:
        return [("", FLOAT, kv.shape(seq))]
    d = kv.head_dim
    dq = d // 2 if kv.bits == 4 else d
    return [("", UINT8, [1, kv.kv_heads, seq, dq]), ("_scale", FLOAT, [1, kv.kv_heads, seq, d // kv.g]),
            ("_zero", UINT8, [1, kv.kv_heads, seq, d // kv.g])]
