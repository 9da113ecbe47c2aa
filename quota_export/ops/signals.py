"""The pruning signals of a stage and its score, per visual token of the span [s0, s0+n).

    magnitude  m_i = ||h_i||_2 (the residual stream entering the layer)
    attention  a_i = mean over heads and the text queries after the span of softmax(q k^T) to token i
               (the layer's own q and cached k, the key bias of merged tokens included)
    risk       r_i = ||Q_A(x_i) - x_i|| / ||x_i|| on the attention block's normed input x
               (+ the same relative error of the cached k_i and v_i when the KV cache is quantized)
    diversity  d_i = 1 - max_{j<i} cos(f_i, f_j), f = the integer codes of the attention input's
               activation quantizer (x itself when unquantized); 2 for the first token
    (with quant.activations.rotation: hadamard, x and f of risk and diversity are taken in the
    checkpoint's basis: reference.Deployed.signal_qkv, docs/rotation.md)
    score      s_i = round((w_m/σ_m m_i + w_a/σ_a a_i - w_r/σ_r r_i + w_d/σ_d d_i) * 2^GRID) (fp32)

On integer codes every dot product f_i . f_j is an exact integer (below 2^24 for 4-bit codes up to
2^18 features), so the cosine matrix is the same bits in fp32 and fp64 and in any summation order;
the diversity signal, max-min selection (ops/maxmin.py) and merging (ops/merge.py) all read it.
Scores are compared on a grid of 2^-GRID so that float noise cannot reorder near-identical tokens
(ties: the lower index, ops/gather.py).

    torch: cosine, signals_from, stage_score        ONNX: cosine_onnx, score_onnx
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from quota_export.ops.attention import Heads, attend, attend_onnx
from quota_export.ops.base import Emit
from quota_export.ops.graph import FLOAT

SCORE_GRID_BITS = 10  # scores are compared at a resolution of 2^-10 (recipe sigmas make them O(1))


class Signals(NamedTuple):
    """Per visual token [1, n] each, in the order of recipe.SIGNALS (and of a stage's weights)."""

    magnitude: torch.Tensor
    attention: torch.Tensor
    risk: torch.Tensor
    diversity: torch.Tensor


def stage_score(w, sigma, mag, att, risk, div):
    """s = w_m m/σ_m + w_a a/σ_a - w_r r/σ_r + w_d d/σ_d, on a grid of 2^-SCORE_GRID_BITS.

    Tokens closer than the grid tie exactly and the lower index wins, so float noise (different
    summation orders in the graphs) cannot reorder near-identical tokens (e.g. background
    patches); only a token sitting on a grid boundary can move. Multiplying by 2^b is exact."""
    (wm, wa, wr, wd), (sm, sa, sr, sd) = w, sigma
    s = (wm / sm) * mag + (wa / sa) * att - (wr / sr) * risk + (wd / sd) * div
    return torch.round(s * float(2**SCORE_GRID_BITS)).float()


def cosine(codes, start: int, n: int, hp):
    """[1, n, n] (hp) cosine similarity of the visual tokens' codes: cs[i, j] = (f_i . f_j) / |f_i| / |f_j|."""
    f = codes[:, start : start + n].to(hp)
    nf = (f * f).sum(-1).sqrt().clamp_min(1e-12)  # [1, n]
    return (f @ f.transpose(-1, -2)) / nf[..., :, None] / nf[..., None, :]


def _rel_err(fq, fp, dims, hp):
    d, b = (fq - fp).to(hp), fp.to(hp)
    return (d * d).sum(dim=dims).sqrt() / (b * b).sum(dim=dims).sqrt().clamp_min(1e-12)


def signals_from(a, h, start: int, n: int, hd: Heads, hp, kv_quantized: bool, bias=None) -> Signals:
    """The four signals from a layer's attention inputs `a` (reference.QKV) on the stream h."""
    vis = slice(start, start + n)
    hv = h[:, vis].to(hp)
    mag = (hv * hv).sum(-1).sqrt()  # [1, n]
    cs = cosine(a.codes, start, n, hp)
    later = torch.ones(n, n, dtype=torch.bool).triu()  # j >= i: not compared
    div = 1.0 - cs.masked_fill(later, -1.0).amax(dim=-1)
    T = h.shape[1]
    qt = a.q[:, :, start + n : T]  # instruction (text) queries after the image
    p, _ = attend(qt, a.k_cache, a.v_cache, hd, hp, causal_offset=start + n, bias=bias)
    att = p[..., vis].mean(dim=(1, 2))  # [1, n]
    risk = _rel_err(a.x_dequant[:, vis], a.xn[:, vis], -1, hp)
    if kv_quantized:
        for fq, fp in ((a.k_cache, a.k), (a.v_cache, a.v)):
            risk = risk + _rel_err(fq[:, :, vis], fp[:, :, vis], (1, 3), hp)
    return Signals(mag, att, risk, div)


def integer_dots_exact_fp32(a_bits: int, features: int) -> bool:
    """Whether every dot product (and partial sum) of two `a_bits` integer code vectors of length
    `features` is an integer below 2^24, i.e. exact in fp32 in any order: |code| <= 2^(bits-1)."""
    return a_bits < 16 and 4 ** (a_bits - 1) * features <= 2**24


def cosine_onnx(e: Emit, codes, s0: int, n: int, integer_codes: bool = False):
    """hp [1,n,n]: the cosine of the span's codes (`cosine`). `integer_codes`: the codes are
    integers whose dot products are exact in fp32 (`integer_dots_exact_fp32`); then f f^T and |f|^2
    run in fp32 (the same integers as in hp, several times faster) and are cast to hp."""
    f = e.slice(codes, s0, s0 + n, 1)
    if not integer_codes:
        f = e.to_hp(f)
    sq = e.to_hp(e.op("ReduceSum", [e.op("Mul", [f, f]), e.ax([-1])], keepdims=1)) if integer_codes else \
        e.op("ReduceSum", [e.op("Mul", [f, f]), e.ax([-1])], keepdims=1)
    nf = e.op("Max", [e.op("Sqrt", [sq]), e.hc(1e-12)], name="code_norm")  # [1, n, 1]
    dot = e.op("MatMul", [f, e.op("Transpose", [f], perm=[0, 2, 1])], name="code_dot")
    if integer_codes:
        dot = e.to_hp(dot)
    return e.op("Div", [e.op("Div", [dot, nf]), e.op("Transpose", [nf], perm=[0, 2, 1])], name="cosine")


def _ratio_onnx(e: Emit, d, b, axes, name: str | None):
    """||d|| / max(||b||, 1e-12) over `axes` (d, b in hp)."""
    num = e.op("Sqrt", [e.op("ReduceSum", [e.op("Mul", [d, d]), e.ax(axes)], keepdims=0)])
    den = e.op("Sqrt", [e.op("ReduceSum", [e.op("Mul", [b, b]), e.ax(axes)], keepdims=0)])
    return e.op("Div", [num, e.op("Max", [den, e.hc(1e-12)])], name=name)


def score_onnx(e: Emit, w, sigma, a, h, cos, s0: int, n: int, hd: Heads, kv_quantized: bool, bias=None):
    """`select: topk`: the stage score [1,n] fp32 (`stage_score` of `signals_from`); `a` the
    layer's attention inputs (lower.decoder.QKVNames), `cos` from `cosine_onnx`."""
    hv = e.to_hp(e.slice(h, s0, s0 + n, 1))
    mag = e.op("Sqrt", [e.op("ReduceSum", [e.op("Mul", [hv, hv]), e.ax([-1])], keepdims=0)], name="magnitude")
    # diversity: 1 - max_{j<i} cos(f_i, f_j); Where masks j >= i with -1 (the first token gets 2)
    later = e.const(np.triu(np.ones((n, n), bool)), np.bool_)
    cs = e.op("Where", [later, e.hc(-1.0), cos], name="cosine_earlier")
    div = e.op("Sub", [e.hc(1.0), e.op("ReduceMax", [cs, e.ax([-1])], keepdims=0)], name="diversity")
    qt = e.slice(a.q, s0 + n, 1 << 30, 2)
    p, _ = attend_onnx(e, qt, a.k_cache, a.v_cache, hd, s0 + n, "score_attn", bias)
    pv = e.slice(p, s0, s0 + n, 3)
    att = e.op("ReduceMean", [pv, e.ax([1, 2])], keepdims=0, name="attention")
    (wm, wa, wr, wd), (sm, sa, sr, sd) = w, sigma
    # risk is computed even at weight 0, as the torch form does
    xv = e.slice(a.xn, s0, s0 + n, 1)
    xdq = a.xn if a.codes is None else e.op("Mul", [a.codes, a.scale], name="dequant_input")
    xqv = e.slice(xdq, s0, s0 + n, 1)
    dif = e.to_hp(e.op("Sub", [xqv, xv]))
    risk = _ratio_onnx(e, dif, e.to_hp(xv), [-1], "risk_act")
    if kv_quantized:
        for nm, fq, fp in (("k", a.k_cache, a.k), ("v", a.v_cache, a.v)):
            fqv = e.slice(fq, s0, s0 + n, 2)
            b = e.to_hp(e.slice(fp, s0, s0 + n, 2))
            d = e.to_hp(e.op("Sub", [fqv, e.slice(fp, s0, s0 + n, 2)]))
            risk = e.op("Add", [risk, _ratio_onnx(e, d, b, [1, 3], None)], name=f"risk_{nm}")
    score = e.op("Add", [e.op("Mul", [e.hc(wm / sm), mag]), e.op("Mul", [e.hc(wa / sa), att])])
    score = e.op("Sub", [score, e.op("Mul", [e.hc(wr / sr), risk])])
    score = e.op("Add", [score, e.op("Mul", [e.hc(wd / sd), div])], name="score_raw")
    score = e.op("Round", [e.op("Mul", [score, e.hc(float(2**SCORE_GRID_BITS))])])
    return e.op("Cast", [score], to=FLOAT, name="score")
