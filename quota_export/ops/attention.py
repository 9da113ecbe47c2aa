"""Attention in the reductions' precision, grouped KV heads, optional causal mask and key bias.

    s = q k^T * d^-1/2 (+ bias on the first T0 keys: merged tokens' log(count), ops/merge.py)
    s = masked_fill(j > i + offset, -inf)  (offset None: no mask, e.g. one decode step)
    p = softmax(s);  out = (p v) rounded to fp32
    torch: attend(...)        ONNX: attend_onnx(...)

The ONNX form computes the same values in forms ONNX Runtime runs faster (measured on one thread,
[1,16,616,616] fp64 scores; docs/numerics.md):
    mask      Add(Trilu(-inf, k = offset + 1)) instead of Where: s + 0 = s and s + -inf = -inf exactly
    scale     when d^-1/2 is a power of two (head_dim 4^k, e.g. 64) it multiplies q [.., Tq, d] instead
              of the scores [.., Tq, Tk]: scaling by 2^-k is exact, so every product and partial sum
              of q k^T is scaled exactly (the same bits)
    softmax   exp(s - max) * (1 / sum) spelled out (ReduceMax, Sub, Exp, ReduceSum, Reciprocal, Mul),
              torch's own order of operations for a softmax over the last axis, in hp
    probs=False   see attend_onnx: normalized after PV, causal queries in blocks
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from quota_export.ops.base import Emit


@dataclass(frozen=True)
class Heads:
    heads: int
    kv_heads: int
    head_dim: int


def attend(q, k, v, hd: Heads, hp, causal_offset: int | None, bias=None):
    """q [1,H,Tq,d], k/v [1,kvh,Tk,d] -> probs [1,H,Tq,Tk] (hp), out [1,H,Tq,d] (fp32).
    `bias` [T0] (hp, T0 <= Tk) is added to the scores of the first T0 keys; [B, T0]: one row per
    batch entry (calibration runs samples as a batch)."""
    q, k, v = q.to(hp), k.to(hp), v.to(hp)
    rep = hd.heads // hd.kv_heads
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) * (hd.head_dim**-0.5)
    if bias is not None:
        t0 = bias.shape[-1]
        s = torch.cat([s[..., :t0] + (bias if bias.dim() == 1 else bias[:, None, None, :]), s[..., t0:]], dim=-1)
    if causal_offset is not None:
        Tq, Tk = s.shape[-2], s.shape[-1]
        i = torch.arange(Tq)[:, None] + causal_offset
        j = torch.arange(Tk)[None, :]
        s = s.masked_fill(j > i, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return p, (p @ v).float()


def repeat_kv_onnx(e: Emit, x, hd: Heads, name: str):
    rep = hd.heads // hd.kv_heads
    if rep == 1:
        return x
    with e.scope(name):
        u = e.op("Unsqueeze", [x, e.ax([2])])
        sh = e.op("Shape", [u])
        t = e.op("Slice", [sh, e.ax([3]), e.ax([4])])
        target = e.op("Concat", [e.const([1, hd.kv_heads, rep], np.int64), t, e.const([hd.head_dim], np.int64)], axis=0)
        x = e.op("Expand", [u, target])
        return e.op("Reshape", [x, e.const([1, hd.heads, -1, hd.head_dim], np.int64)])


def causal_mask_onnx(e: Emit, scores, offset, name: str):
    """masked_fill(j > i + offset, -inf) on [1,H,Tq,Tk] scores as scores + M, M [Tq,Tk] = -inf where
    j - i >= offset + 1 (Trilu) and 0 elsewhere. `offset`: an int, an int64 scalar tensor, or None
    (no mask)."""
    if offset is None:
        return scores
    with e.scope(name):
        diag = e.const(offset + 1, np.int64) if isinstance(offset, int) else e.op("Add", [offset, e.const(1, np.int64)])
        tqk = e.op("Slice", [e.op("Shape", [scores]), e.ax([2]), e.ax([4])])
        ninf = e.op("ConstantOfShape", [tqk], value=onnx.numpy_helper.from_array(e.hconst([-np.inf])))
        m = e.op("Trilu", [ninf, diag], upper=1, name="future")
        return e.op("Add", [scores, m], name="masked")


def pow2_scale(head_dim: int) -> bool:
    """Whether head_dim^-1/2 is a power of two (head_dim = 4^k), so that scaling q by it is exact."""
    return head_dim > 0 and (head_dim & (head_dim - 1)) == 0 and (head_dim.bit_length() - 1) % 2 == 0


def _query_blocks(e: Emit, q, kt, v, bias, chunks: int):
    """Causal attention with offset 0 split into `chunks` blocks of queries [a, b): a block sees
    the keys [0, b) only (the rest are masked for all its rows), with the mask's offset a."""
    T = e.op("Slice", [e.op("Shape", [q]), e.ax([2]), e.ax([3])], name="seq")
    zero = e.const([0], np.int64)
    bounds = [zero] + [e.op("Div", [e.op("Mul", [T, e.const([i], np.int64)]), e.const([chunks], np.int64)],
                             name=f"bound{i}") for i in range(1, chunks)] + [T]
    for a, b in zip(bounds, bounds[1:]):
        kb = e.op("Max", [b, e.const([1], np.int64)])  # a block without rows (T < chunks) keeps one key
        yield (e.op("Slice", [q, a, b, e.ax([2])]), e.op("Slice", [kt, zero, kb, e.ax([3])]),
               e.op("Slice", [v, zero, kb, e.ax([2])]), None if bias is None else e.op("Slice", [bias, zero, kb, e.ax([0])]),
               e.op("Squeeze", [a, e.ax([0])]))


QUERY_CHUNKS = 4  # causal attention without the probabilities: 10/16 of the T^2 work (docs/numerics.md)


def attend_onnx(e: Emit, q, k, v, hd: Heads, offset: int | None, name: str, bias=None, probs: bool = True):
    """-> (probs hp, out fp32). `bias` = (hp [T0], T0) from `key_bias_onnx`, added to the scores
    of the first T0 = start+k keys.

    `probs=False` (the layers' own attention; the signals need the probabilities): -> (None, out),
    normalized after the weighted sum, out = (exp(s - max) v) * (1 / sum), and with offset 0 split
    into QUERY_CHUNKS blocks of queries that skip the keys no row of the block sees. The same
    values up to fp64 rounding (the terms left out are exp(-inf) = 0), rounded once to fp32."""
    with e.scope(name):
        q = e.to_hp(q)
        k = e.to_hp(repeat_kv_onnx(e, k, hd, "repeat_k"))
        v = e.to_hp(repeat_kv_onnx(e, v, hd, "repeat_v"))
        # the scale as a [1,H,1,1] constant, not a scalar: ONNX Runtime's MatMulScaleFusion folds
        # a scalar into FusedMatMul's alpha, a float32 attribute, so fp64 scores would be scaled
        # by float32(1/sqrt(d)) (a 1e-8 relative error, a last-bit difference in ~20% of the
        # attention outputs and, through the 4-bit quantizers, flipped kept tokens)
        scale = e.hc(np.full((1, hd.heads, 1, 1), hd.head_dim**-0.5))
        pre = pow2_scale(hd.head_dim)
        if pre:
            q = e.op("Mul", [q, scale], name="scale")
        kt = e.op("Transpose", [k], perm=[0, 1, 3, 2])
        if bias is not None:
            # zeros for the keys after the kept tokens (their count is dynamic): + 0 is exact
            b, t0 = bias
            tk = e.op("Slice", [e.op("Shape", [k]), e.ax([2]), e.ax([3])])
            rest = e.op("Sub", [tk, e.const([t0], np.int64)], name="bias_rest")
            pad = e.op("ConstantOfShape", [rest], value=onnx.numpy_helper.from_array(e.hconst([0.0])))
            bias = e.op("Concat", [b, pad], axis=0, name="bias_full")
        if not probs and offset == 0 and QUERY_CHUNKS > 1:
            blocks = list(_query_blocks(e, q, kt, v, bias, QUERY_CHUNKS))
        else:
            blocks = [(q, kt, v, bias, offset)]
        p, outs = None, []
        for i, (qb, ktb, vb, bb, off) in enumerate(blocks):
            with e.scope(f"block{i}") if len(blocks) > 1 else contextlib.nullcontext():
                s = e.op("MatMul", [qb, ktb], name="QK")
                if not pre:
                    s = e.op("Mul", [s, scale], name="scale")
                if bb is not None:
                    s = e.op("Add", [s, bb], name="key_bias")
                s = causal_mask_onnx(e, s, off, "mask")
                # softmax over the last axis in torch's order: exp(s - max) * (1 / sum)
                ex = e.op("Exp", [e.op("Sub", [s, e.op("ReduceMax", [s, e.ax([-1])], keepdims=1)])])
                r = e.op("Reciprocal", [e.op("ReduceSum", [ex, e.ax([-1])], keepdims=1)])
                if probs:
                    p = e.op("Mul", [ex, r], name="Softmax")
                    outs.append(e.op("MatMul", [p, vb], name="PV"))
                else:
                    outs.append(e.op("Mul", [e.op("MatMul", [ex, vb], name="EV"), r], name="PV"))
        o = outs[0] if len(outs) == 1 else e.op("Concat", outs, axis=2, name="blocks")
        return p, e.to_f(o)
