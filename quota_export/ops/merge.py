"""Token merging (`pruning.merge: proportional`): counts of merged tokens and the key bias they give.

After a stage keeps `idx` of the n visual tokens, each dropped token adds its count to the kept
token most similar to it (the stage's code cosine, ops/signals.py; ties: the lower kept index).
From that stage on every attention adds log(count) to the logits of those keys (0 on the text
before the span; keys after the kept tokens get none): where the dropped tokens repeat a kept one
(background patches), the softmax sees nearly the mass it saw before pruning.

    torch: merge_counts, key_bias            ONNX: merge_counts_onnx, key_bias_onnx

Counts are integers 1..N, exact in any precision. log(count) in the graphs is a Gather from a
table of torch's own values, not a Log node: ONNX Runtime's Log differs from torch's in the last
bit on 23% of the integers 1..5000 in fp64 (3% in fp32).
"""

from __future__ import annotations

import numpy as np
import torch

from quota_export.ops.base import Emit
from quota_export.ops.graph import DOUBLE, FLOAT, INT64


def merge_counts(cs, idx, cnt):
    """cs [1,n,n] the stage's cosine, idx [1,k] kept (ascending), cnt [n] float64 -> counts [k]."""
    n = cs.shape[-1]
    keep = idx[0]
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[keep] = False
    drop = dropped.nonzero()[:, 0]
    out = cnt[keep].clone()
    if drop.numel():
        out.index_add_(0, cs[0][drop][:, keep].argmax(dim=-1), cnt[drop])  # argmax: first maximum
    return out


def key_bias(cnt, start: int, hp):
    """[start + k] (hp): 0 on the text before the span, log(count) on the k kept visual tokens.
    None without counts."""
    if cnt is None:
        return None
    return torch.cat([torch.zeros(start, dtype=hp), cnt.log().to(hp)])


def key_bias_onnx(e: Emit, cnt, k: int, s0: int, n_visual: int, name: str):
    """counts [1,k] (float) -> (bias hp [s0+k], s0+k), as `key_bias`."""
    with e.scope(name):
        table = e.hc(torch.arange(n_visual + 1, dtype=torch.float64).log().numpy())  # [0] = -inf, unused
        idx = e.op("Cast", [e.op("Reshape", [cnt, e.ax([-1])])], to=INT64, name="count")
        lg = e.op("Gather", [table, idx], axis=0, name="log_count")
        if s0 == 0:
            return lg, k
        return e.op("Concat", [e.hc(np.zeros(s0)), lg], axis=0, name="bias"), s0 + k


def merge_counts_onnx(e: Emit, cosine, kept, cnt, k: int):
    """Counts [1,k] of the kept tokens, as `merge_counts`. cosine hp [1,n,n], kept int64 [k]
    ascending, cnt hp [1,n]."""
    with e.scope("merge"):
        ck = e.op("Gather", [cosine, kept], axis=2, name="cosine_kept")  # [1,n,k]
        # the first maximum spelled out (ReduceMax, Equal, ReduceMin of the column): tokens with
        # identical codes tie exactly, which is the case merging is for, and TensorRT does not
        # document how its ArgMax (a TopK) breaks ties
        top = e.op("ReduceMax", [ck, e.ax([-1])], keepdims=1)
        col = e.hc(np.arange(k))
        cand = e.op("Where", [e.op("Equal", [ck, top]), col, e.hc(float(k))])
        first = e.op("ReduceMin", [cand, e.ax([-1])], keepdims=1, name="nearest_kept")  # [1,n,1]
        onehot = e.op("Cast", [e.op("Equal", [first, col])], to=DOUBLE if e.fp64 else FLOAT, name="onehot")
        # the dropped tokens' counts (kept ones zeroed), summed into their nearest kept token:
        # integers, exact in any order
        kidx = e.op("Unsqueeze", [kept, e.ax([0])])
        w = e.op("ScatterElements", [cnt, kidx, e.hc(np.zeros((1, k)))], axis=1, name="dropped")
        moved = e.op("MatMul", [e.op("Unsqueeze", [w, e.ax([1])]), onehot], name="moved")  # [1,1,k]
        return e.op("Add", [e.op("Gather", [cnt, kept], axis=1), e.op("Squeeze", [moved, e.ax([1])])],
                    name="counts")
