"""numpy reference of `quota::TokenGather`: the rule the Triton kernel and the ONNX subgraph reproduce.

    hidden [B, T, H] ──┐        rows [0, start)          text, passed through
    position_ids ──────┼──►     rows [start, start+N)    visual: keep top-k by score, original order
    scores [B, N] ─────┘        rows [start+N, T)        text, passed through
                         ──►  hidden_out [B, T-N+k, H], position_ids_out [.., T-N+k], kept [B, k]

Selection (ONNX TopK with largest=1, sorted=1, then the k indices sorted ascending):
visual token i is kept iff rank_i < k, rank_i = #{j : s_j > s_i or (s_j == s_i and j < i)}.
-0.0 equals +0.0; NaN ranks as -inf (tied with -inf and with other NaNs, lower index first),
the same rule as `quota_export.ops.gather.stable_topk`.
"""

from __future__ import annotations

import numpy as np


def select_kept(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices [B, k] (int64, ascending) of the k best scores of each row of `scores` [B, N]."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [B, N], got shape {scores.shape}")
    n = scores.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range [1, {n}]")
    s = np.where(np.isnan(scores), -np.inf, scores.astype(np.float64))  # NaN ranks as -inf
    s = s + 0.0  # -0.0 -> +0.0 (they compare equal anyway; keeps the sort key canonical)
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    for b in range(scores.shape[0]):
        # stable sort on -s: descending score, equal scores in index order (lower index first)
        order = np.argsort(-s[b], kind="stable")[:k]
        out[b] = np.sort(order)
    return out


def token_gather_reference(
    hidden: np.ndarray, position_ids: np.ndarray, scores: np.ndarray, *, k: int, start: int, n_visual: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hidden_out, position_ids_out, kept) of `quota::TokenGather`.

    hidden [B, T, H] (any float dtype, copied bit-exactly), position_ids [B, T] or [3, B, T]
    (M-RoPE) int64, scores [B, N] with N == n_visual.
    """
    hidden = np.asarray(hidden)
    position_ids = np.asarray(position_ids)
    scores = np.asarray(scores)
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {hidden.shape}")
    b, t, _ = hidden.shape
    if scores.shape != (b, n_visual):
        raise ValueError(f"scores must be [B, N] = [{b}, {n_visual}], got shape {scores.shape}")
    if position_ids.shape not in ((b, t), (3, b, t)):
        raise ValueError(f"position_ids must be [B, T] or [3, B, T], got shape {position_ids.shape}")
    if not (0 <= start and start + n_visual <= t):
        raise ValueError(f"visual span [{start}, {start + n_visual}) outside [0, {t})")
    kept = select_kept(scores, k)
    rows = np.concatenate(
        [
            np.broadcast_to(np.arange(start), (b, start)),
            kept + start,
            np.broadcast_to(np.arange(start + n_visual, t), (b, t - start - n_visual)),
        ],
        axis=1,
    ).astype(np.int64)  # [B, T-N+k] source row of every output row
    hidden_out = np.take_along_axis(hidden, rows[:, :, None], axis=1)
    pos_rows = np.broadcast_to(rows, position_ids.shape[:-1] + rows.shape[-1:])  # same rows for every M-RoPE plane
    pos_out = np.take_along_axis(position_ids, pos_rows, axis=-1)
    return np.ascontiguousarray(hidden_out), np.ascontiguousarray(pos_out), kept
