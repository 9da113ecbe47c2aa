"""Pure token-selection functions used by the stage-wise baselines.

Each returns kept-token indices [B, k] (int64), sorted ascending (the tokens' original order),
and is deterministic: the same inputs give the same indices on any machine.
"""

from __future__ import annotations

import random

import torch

from quota_export.ops.maxmin import maxmin_order

# Elements (B * N * chunk * D) per slab when building the pairwise distance matrix.
_SLAB = 1 << 22


def random_keep(n: int, k: int, seed: int, batch: int = 1) -> torch.Tensor:
    """k of n token indices chosen uniformly at random without replacement, per row.

    Rows are successive draws of one `random.Random(seed)` (pure Python, so independent of the
    torch/numpy version): row b depends only on (seed, b), and the first rows of a larger batch
    equal a smaller batch with the same seed.
    """
    n, k, batch = int(n), int(k), int(batch)
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"random_keep: need 0 <= k <= n, got n={n} k={k}")
    if batch < 1:
        raise ValueError(f"random_keep: batch must be >= 1, got {batch}")
    rng = random.Random(int(seed))
    rows = [sorted(rng.sample(range(n), k)) for _ in range(batch)]
    return torch.tensor(rows, dtype=torch.int64).reshape(batch, k)


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine distance 1 - cos(x_i, x_j), [B, N, N] float64.

    Computed as an elementwise product summed over D for every pair (not a matmul), so equal
    feature vectors give bit-identical rows and the matrix is exactly symmetric: ties between
    duplicate tokens are real ties, which the selection then breaks by index. A zero vector has
    cosine 0 to everything (distance 1).
    """
    x = features.to(torch.float64)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    b, n, d = x.shape
    dist = torch.empty(b, n, n, dtype=torch.float64)
    step = max(1, _SLAB // max(1, b * n * d))
    for j in range(0, n, step):
        cols = x[:, j : j + step, :]  # [B, c, D]
        dist[:, :, j : j + step] = 1.0 - (x[:, :, None, :] * cols[:, None, :, :]).sum(-1)
    return dist


def divprune(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune (Alvar et al., CVPR 2025): greedy max-min diversity selection of k tokens.

    `features` [B, N, D] (the visual tokens' features, e.g. projected image features), distances
    are cosine distances (`cosine_distance`). Per row:

    1. start: the token whose nearest other token is farthest away (argmax_i min_{j != i} d_ij),
       as in the reference implementation (which takes the second-smallest entry of each column,
       the smallest being the token itself);
    2. then, k - 1 times: add the not-yet-selected token farthest from the selected set
       (argmax_i min_{s in S} d_is).

    Every argmax breaks ties by the lower index; already-selected tokens are never picked again
    (the reference code could re-pick one when all remaining tokens duplicate selected ones).
    With N = 1 the start is token 0. Features must be finite.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        raise ValueError("divprune: features must be a 3-D tensor [B, N, D]")
    b, n, _ = features.shape
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"divprune: k={k} out of range [0, {n}]")
    if not torch.isfinite(features).all():
        raise ValueError("divprune: features contain NaN or inf")
    if k == 0:
        return torch.empty(b, 0, dtype=torch.int64)
    if k == n:
        return torch.arange(n, dtype=torch.int64).expand(b, n).clone()
    # max-min over distances == min-max over their negation (exact), the form maxmin_order takes
    order = maxmin_order(-cosine_distance(features), k)
    return torch.sort(order, dim=1).values.to(torch.int64)
