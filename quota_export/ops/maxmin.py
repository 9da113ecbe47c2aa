"""`select: maxmin`: greedy max-min diversity selection (DivPrune's rule) as a stage's score.

On the stage's code cosine (ops/signals.py `cosine`): first the token least similar to its most
similar other token, then, k - 1 times, the token least similar to everything picked so far
(every argmin the first minimum: ties to the lower index). The i-th pick scores k - i, the rest
0, so the stage's top-k gather (ops/gather.py) keeps exactly the picked set.

    torch: maxmin_order (the order of picks), maxmin_score      ONNX: maxmin_score_onnx (unrolled,
    k static: per step a masked ReduceMin, the first minimum picked with Equal/ReduceMin, a Gather
    of the picked token's cosine column and a running Max)
"""

from __future__ import annotations

import numpy as np
import torch

from quota_export.ops.base import Emit
from quota_export.ops.graph import INT64


def maxmin_order(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity selection on a similarity matrix: the order [B, k] (int64) in
    which the k tokens are picked (not sorted).

    `sim` [B, N, N]: sim[b, i, j] = similarity of token i to token j (need not be symmetric; the
    rows are read as given, so a graph computing the same matrix picks the same tokens).

    1. start: the token least similar to its most similar other token
       (argmin_i max_{j != i} sim[i, j]);
    2. then, k - 1 times: the not-yet-picked token least similar to the picked set
       (argmin_i max_{s picked} sim[i, s]).

    Every argmin takes the first minimum (the lower index wins ties); picked tokens are never
    picked again. With N = 1 the start is token 0. This is DivPrune's selection with similarity
    in place of distance (max-min distance = min-max similarity).
    """
    if not isinstance(sim, torch.Tensor) or sim.dim() != 3 or sim.shape[1] != sim.shape[2]:
        raise ValueError("maxmin_order: sim must be a 3-D tensor [B, N, N]")
    b, n, _ = sim.shape
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"maxmin_order: k={k} out of range [0, {n}]")
    if k == 0:
        return torch.empty(b, 0, dtype=torch.int64)
    rows = torch.arange(b)
    eye = torch.eye(n, dtype=torch.bool)
    nearest = sim.masked_fill(eye, float("-inf")).amax(dim=-1)  # [B, N]; -inf when N == 1
    first = torch.argmin(nearest, dim=1)  # the first minimum
    picked = torch.zeros(b, n, dtype=torch.bool)
    picked[rows, first] = True
    out = [first]
    to_sel = sim[rows, :, first]  # [B, N]: similarity of every token to the picked set
    for _ in range(k - 1):
        nxt = torch.argmin(to_sel.masked_fill(picked, float("inf")), dim=1)
        picked[rows, nxt] = True
        out.append(nxt)
        to_sel = torch.maximum(to_sel, sim[rows, :, nxt])
    return torch.stack(out, dim=1).to(torch.int64)


def maxmin_score(cs: torch.Tensor, k: int) -> torch.Tensor:
    """cs [1,n,n] -> score [1,n] fp32: the i-th token picked gets k - i, the others 0."""
    order = maxmin_order(cs, k)
    s = torch.zeros(1, cs.shape[-1])
    s[0, order[0]] = torch.arange(k, 0, -1, dtype=torch.float32)
    return s


def maxmin_score_onnx(e: Emit, cosine, n: int, k: int):
    """cosine hp [1,n,n] -> score [1,n] fp32, as `maxmin_score`."""
    with e.scope("maxmin"):
        idx = e.hc(np.arange(n)[None])  # [1,n]
        big = e.hc(float(n))

        def first_min(x, nm):  # [1,n] -> index [1,1] (hp), the lowest index among the minima
            m = e.op("ReduceMin", [x, e.ax([-1])], keepdims=1)
            return e.op("ReduceMin", [e.op("Where", [e.op("Equal", [x, m]), idx, big]), e.ax([-1])],
                        keepdims=1, name=nm)

        def column(i, nm):  # cosine[:, :, i] -> [1,n]
            j = e.op("Cast", [e.op("Reshape", [i, e.ax([-1])])], to=INT64)
            return e.op("Reshape", [e.op("Gather", [cosine, j], axis=2), e.ax([1, n])], name=nm)

        eye = e.const(np.eye(n, dtype=bool)[None], np.bool_)
        near = e.op("ReduceMax", [e.op("Where", [eye, e.hc(-np.inf), cosine]), e.ax([-1])],
                    keepdims=0, name="nearest")  # [1,n]
        pick = first_min(near, "pick_0")
        hit = e.op("Equal", [idx, pick])
        picked = hit
        score = e.op("Where", [hit, e.const(float(k)), e.const(np.zeros((1, n), np.float32))])
        to_sel = column(pick, "to_picked_0")
        for t in range(1, k):
            cand = e.op("Where", [picked, e.hc(np.inf), to_sel])
            pick = first_min(cand, f"pick_{t}")
            hit = e.op("Equal", [idx, pick])
            picked = e.op("Or", [picked, hit])
            score = e.op("Where", [hit, e.const(float(k - t)), score])
            if t < k - 1:
                to_sel = e.op("Max", [to_sel, column(pick, f"column_{t}")], name=f"to_picked_{t}")
        return e.op("Identity", [score], name="score")
