"""Schedule arithmetic shared by QUOTA calibration and the stage-wise baselines.

A schedule is stage layers (ascending) and keep counts: layers before the first stage hold all N
visual tokens, a stage at layer l holds for l and every later layer until the next stage.
"""

from __future__ import annotations

import math


def budget_cap(budget: float, n_visual: int, num_layers: int) -> int:
    """Largest total of kept visual tokens summed over layers with mean <= budget * N."""
    return int(math.floor(budget * n_visual * num_layers + 1e-9))


def kept_per_layer(layers, keeps, n_visual: int, num_layers: int) -> list[int]:
    """Visual tokens held by each decoder layer."""
    out, n, j = [], n_visual, 0
    for l in range(num_layers):
        while j < len(layers) and layers[j] <= l:
            n, j = keeps[j], j + 1
        out.append(n)
    return out


def total_kept(layers, keeps, n_visual: int, num_layers: int) -> int:
    return sum(kept_per_layer(layers, keeps, n_visual, num_layers))


def geometric_keeps(layers, ratio: float, n_visual: int, num_layers: int, budget: float) -> list[int] | None:
    """keeps k_j = max(1, floor(k_1 * ratio**j)) at `layers`, with k_1 <= N the largest meeting the
    budget; None if even k_1 = 1 does not."""
    cap = budget_cap(budget, n_visual, num_layers)

    def keeps_for(k1):
        return [max(1, int(math.floor(k1 * ratio**j + 1e-9))) for j in range(len(layers))]

    if total_kept(layers, keeps_for(1), n_visual, num_layers) > cap:
        return None
    lo, hi = 1, n_visual  # total is non-decreasing in k1: binary search the largest feasible
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total_kept(layers, keeps_for(mid), n_visual, num_layers) <= cap:
            lo = mid
        else:
            hi = mid - 1
    return keeps_for(lo)
