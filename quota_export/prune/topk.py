"""Deterministic budgeted top-k: the selection rule every artifact must reproduce exactly.

ONNX TopK (opset 11+) defines its tie order: among equal values the element with the lower
index comes first. `torch.topk` promises no tie order, so the reference never uses it; it takes
a stable descending sort instead, which keeps equal scores in index order.
"""

from __future__ import annotations

import torch


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] (int64) of the k highest scores of each row of `scores` [B, N].

    - ties: the lower index wins (ONNX TopK's rule), so the result is fully determined by the
      values; -0.0 and +0.0 are equal;
    - NaN scores rank as -inf: below every number, tied with -inf (and so with each other) and
      ordered among those by index. A NaN is never kept while a non-NaN score is dropped;
    - the k indices of a row are returned sorted ascending (the tokens' original order), which is
      how the kept tokens are gathered.

    Integer and floating scores are accepted; `0 <= k <= N`.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(
            f"stable_topk: scores must be a 2-D tensor [B, N], got "
            f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}"
        )
    if scores.dtype == torch.bool or scores.is_complex():
        raise ValueError(f"stable_topk: scores must be real numbers, got {scores.dtype}")
    k = int(k)
    n = scores.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"stable_topk: k={k} out of range [0, {n}]")
    if scores.is_floating_point():
        scores = torch.where(torch.isnan(scores), float("-inf"), scores)
    # stable=True keeps equal keys in index order, also with descending=True
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values.to(torch.int64)
