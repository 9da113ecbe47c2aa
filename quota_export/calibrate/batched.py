"""The deployed decoder on a batch of calibration samples of one prompt shape.

`Deployed` (reference.py) runs one sample [1, T, D]; calibration runs the samples of equal prompt
length, visual span and positions as one tensor [B, T, D], so that every op is issued once per
batch rather than once per sample. After a pruning stage every sample keeps its own tokens:
positions become [B, T'] (planes [P, B, T']), merged-token counts [B, k] and the key bias [B, T0].

Everything here composes `Deployed`'s public pieces (qkv, mm, act, mlp, head) and the ops of
`quota_export/ops/`; what had to be restated for a per-sample key bias (the attention, the layer,
the stage signals) mirrors `ops/attention.attend`, `Deployed.layer` and `ops/signals.signals_from`
line for line. Row b of every result is what `Deployed` computes for sample b alone, bit for bit
(tests/calibrate/test_calibrate.py checks the divergence against `Deployed.prefill`).
"""

from __future__ import annotations

import torch

from quota_export.ops.merge import merge_counts
from quota_export.ops.maxmin import maxmin_order
from quota_export.ops.signals import Signals, _rel_err, cosine
from quota_export.reference import QKV


def attend(q, k, v, hd, hp, causal_offset: int | None, bias=None):
    """ops.attention.attend with `bias` [B, T0] (one row per sample) -> (probs hp, out fp32)."""
    q, k, v = q.to(hp), k.to(hp), v.to(hp)
    rep = hd.heads // hd.kv_heads
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) * (hd.head_dim**-0.5)
    if bias is not None:
        t0 = bias.shape[-1]
        s = torch.cat([s[..., :t0] + bias[:, None, None, :], s[..., t0:]], dim=-1)
    if causal_offset is not None:
        Tq, Tk = s.shape[-2], s.shape[-1]
        i = torch.arange(Tq)[:, None] + causal_offset
        j = torch.arange(Tk)[None, :]
        s = s.masked_fill(j > i, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return p, (p @ v).float()


def layer(dep, l: int, h, pos, pre: QKV | None = None, bias=None, last_only: bool = False):
    """Deployed.layer on a batch (the next hidden states only). `last_only`: only the last
    position's output [B, 1, D] (what the head reads after the last layer; its attention row
    is computed alone, so it may differ from the full layer's in the last bit)."""
    sp = dep.spec
    a = dep.qkv(l, h, pos) if pre is None else pre
    q = a.q
    if last_only:
        q, h = q[:, :, -1:], h[:, -1:]
    _, o = attend(q, a.k_cache, a.v_cache, dep.heads, dep.hp, a.k_cache.shape[2] - q.shape[2], bias)
    B, T = h.shape[:2]
    o = o.transpose(1, 2).reshape(B, T, sp.heads * sp.head_dim)
    h = h + dep.mm(dep.act(o, l, "self_attn.o_proj"), l, "self_attn.o_proj")
    return h + dep.mlp(l, h)


def signals(dep, a: QKV, h, start: int, n: int, cs, bias=None) -> Signals:
    """ops.signals.signals_from on a batch, `cs` the stage's code cosine [B, n, n] (`cosine`)."""
    hp = dep.hp
    vis = slice(start, start + n)
    hv = h[:, vis].to(hp)
    mag = (hv * hv).sum(-1).sqrt()  # [B, n]
    later = torch.ones(n, n, dtype=torch.bool).triu()
    div = 1.0 - cs.masked_fill(later, -1.0).amax(dim=-1)
    qt = a.q[:, :, start + n : h.shape[1]]
    p, _ = attend(qt, a.k_cache, a.v_cache, dep.heads, hp, start + n, bias)
    att = p[..., vis].mean(dim=(1, 2))
    risk = _rel_err(a.x_dequant[:, vis], a.xn[:, vis], -1, hp)
    if dep.cfg.kv_bits < 16:
        for fq, fp in ((a.k_cache, a.k), (a.v_cache, a.v)):
            risk = risk + _rel_err(fq[:, :, vis], fp[:, :, vis], (1, 3), hp)
    return Signals(mag, att, risk, div)


def code_cosine(dep, a: QKV, start: int, n: int):
    """[B, n, n] (hp): Deployed.cosine from an already computed QKV."""
    return cosine(a.codes, start, n, dep.hp)


def maxmin_scores(cs, k: int):
    """ops.maxmin.maxmin_score per row: [B, n, n] -> [B, n] fp32 (the i-th pick scores k - i)."""
    order = maxmin_order(cs, k)
    s = torch.zeros(cs.shape[0], cs.shape[-1])
    s.scatter_(1, order, torch.arange(k, 0, -1, dtype=torch.float32).expand(cs.shape[0], k).contiguous())
    return s


def counts(cs, idx, cnt):
    """ops.merge.merge_counts per row: cosine [B,n,n], kept [B,k], counts [B,n] (fp64) -> [B,k]."""
    return torch.stack([merge_counts(cs[b : b + 1], idx[b : b + 1], cnt[b]) for b in range(idx.shape[0])])


def key_bias(cnt, start: int, hp):
    """ops.merge.key_bias per row: [B, k] counts -> [B, start + k] (hp), or None."""
    if cnt is None:
        return None
    return torch.cat([torch.zeros(cnt.shape[0], start, dtype=hp), cnt.log().to(hp)], dim=1)


def gather_rows(h, pos, idx, start: int, n: int):
    """ops.gather.gather_rows per row: keep the visual rows idx [B, k] -> (h', pos', rows [B, T'])."""
    B, T = h.shape[:2]
    rows = torch.cat([torch.arange(start).expand(B, start), start + idx,
                      torch.arange(start + n, T).expand(B, T - start - n)], dim=1)
    h2 = h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1]))
    pos2 = pos.gather(pos.dim() - 1, rows.expand(*pos.shape[:-2], -1, -1))
    return h2, pos2, rows


def qkv_rows(a: QKV, rows) -> QKV:
    """QKV.rows per sample: rows [B, T'] of every token axis."""
    def tok(t):  # [B, T, ...]
        if t is None:
            return None
        return t.gather(1, rows.view(*rows.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))

    def head(t):  # [B, H, T, ...]
        if t is None:
            return None
        r = rows[:, None].view(rows.shape[0], 1, rows.shape[1], *([1] * (t.dim() - 3)))
        return t.gather(2, r.expand(-1, t.shape[1], -1, *t.shape[3:]))

    quant = lambda t: None if t is None else tuple(head(x) for x in t)  # noqa: E731
    return QKV(tok(a.xn), (tok(a.x[0]), tok(a.x[1])), head(a.q), head(a.k), head(a.v),
               head(a.k_cache), head(a.v_cache), quant(a.k_quant), quant(a.v_quant))
