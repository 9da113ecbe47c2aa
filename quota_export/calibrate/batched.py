"""The deployed decoder on a batch of calibration samples of one prompt shape.

`Deployed` (reference.py) runs one sample [1, T, D]; calibration runs the samples of equal prompt
length, visual span and positions as one tensor [B, T, D], so that every op is issued once per
batch rather than once per sample. After a pruning stage every sample keeps its own tokens:
positions become [B, T'] (planes [P, B, T']), merged-token counts [B, k] and the key bias [B, T0].

Everything here composes `Deployed`'s public pieces (qkv, attend, mm, act, mlp) and the ops of
`quota_export/ops/` (`ops.attention.attend` takes the key bias per sample, [B, T0]); `layer`
restates `Deployed.layer` so that the last layer can run on the answer position only. Row b of
every result is what `Deployed` computes for sample b alone, bit for bit
(tests/calibrate/test_calibrate.py).
"""

from __future__ import annotations

import torch

from quota_export.ops.maxmin import maxmin_order
from quota_export.ops.merge import merge_counts
from quota_export.ops.signals import cosine
from quota_export.reference import QKV


def layer(dep, l: int, h, pos, pre: QKV | None = None, bias=None, last_only: bool = False):
    """Deployed.layer on a batch (the next hidden states only). `last_only`: only the last
    position's output [B, 1, D] (what the head reads after the last layer; its attention row
    is computed alone, so it may differ from the full layer's in the last bit)."""
    sp = dep.spec
    a = dep.qkv(l, h, pos) if pre is None else pre
    q = a.q
    if last_only:
        q, h = q[:, :, -1:], h[:, -1:]
    _, o = dep.attend(q, a.k_cache, a.v_cache, a.k_cache.shape[2] - q.shape[2], bias)
    B, T = h.shape[:2]
    o = o.transpose(1, 2).reshape(B, T, sp.heads * sp.head_dim)
    h = h + dep.mm(dep.act(o, l, "self_attn.o_proj"), l, "self_attn.o_proj")
    return h + dep.mlp(l, h)


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
