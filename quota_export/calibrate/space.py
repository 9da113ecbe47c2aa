"""The search space of QUOTA calibration: typed candidates, the weight grid, the starts, the shapes.

A candidate is a tuple of `CandStage`s; each stage picks its tokens with a `Scorer`: the top-k of
a weighted score (`select: topk`) or max-min selection (`select: maxmin`, layer 0 only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

from quota_export import UserError
from quota_export.prune.schedule import geometric_keeps
from quota_export.recipe import SIGNALS  # the order of a weight vector's entries

Vector = tuple[float, float, float, float]  # (w_m, w_a, w_r, w_d)


@dataclass(frozen=True)
class Scorer:
    """How a stage picks its tokens: the top-k of w . signals (`topk`), or greedy max-min
    selection on the stage's code cosine (`maxmin`, which uses no weights)."""

    weights: Vector = (0.0, 0.0, 0.0, 0.0)
    select: str = "topk"

    def __post_init__(self):
        if self.select not in ("topk", "maxmin"):
            raise ValueError(f"select {self.select!r}")
        if (self.select == "maxmin") == any(self.weights):
            raise ValueError(f"a {self.select} scorer {'needs' if self.select == 'topk' else 'takes no'} weights")


@dataclass(frozen=True)
class CandStage:
    """One stage of a candidate schedule."""

    layer: int
    keep: int
    scorer: Scorer


Candidate = tuple[CandStage, ...]

# Max-min selection: DivPrune's set selection on the deployed model's own codes. Tried wherever a
# weight vector is at a stage on layer 0 (last, so ties keep the scorers); deeper stages cannot
# take it (recipe.Stage: float noise in the graphs' hidden states can flip an activation code
# there, and a greedy set selection has no score grid to absorb it). It belongs to the diversity
# signal (ablations without diversity drop it).
MAXMIN = Scorer(select="maxmin")

# Attention-only first, so that ties keep the simplest scorer; the vectors with a diversity weight
# come last, so that ties keep the earlier three-signal scorers; max-min last of all.
W_GRID: tuple[Scorer, ...] = tuple(Scorer(w) for w in (
    (0.0, 1.0, 0.0, 0.0),
    (0.5, 1.0, 0.0, 0.0),
    (1.0, 1.0, 0.0, 0.0),
    (0.0, 1.0, 0.5, 0.0),
    (0.0, 1.0, 1.0, 0.0),
    (0.5, 1.0, 0.5, 0.0),
    (1.0, 1.0, 1.0, 0.0),
    (1.0, 0.0, 0.0, 0.0),
    (0.0, 1.0, 0.0, 0.5),
    (0.0, 1.0, 0.0, 1.0),
    (0.0, 1.0, 0.0, 2.0),
    (0.5, 1.0, 0.0, 1.0),
    (0.0, 1.0, 0.5, 1.0),
    (0.0, 0.0, 0.0, 1.0),
    (0.5, 0.0, 0.0, 1.0),
    (0.0, 0.0, 0.5, 1.0),
    (0.0, 0.0, 1.0, 0.0),
)) + (MAXMIN,)  # fmt: skip
# phase A's single-signal scorers, in order: attention-only first (ties keep it)
STARTS: tuple[Scorer, ...] = (Scorer((0.0, 1.0, 0.0, 0.0)), Scorer((1.0, 0.0, 0.0, 0.0)),
                              Scorer((0.0, 0.0, 0.0, 1.0)), MAXMIN)
R_SHAPES = (0.6, 0.35)  # decay ratios of the shape search (stages >= 2)
R_FINE = (0.8, 0.7, 0.6, 0.5, 0.35, 0.25)  # decay ratios tried in phase C
MAX_STAGES = 3
FINALISTS = 8  # best screened candidates measured on the objective itself (search.py, phase D)


def screen_size(samples: int) -> int:
    """Samples of the screen (Evaluator.focus): a quarter of them, at least 8 (all if fewer)."""
    return min(samples, max(8, -(-samples // 4)))
MAX_LAYER_GRID = 8  # at most this many candidate stage layers (evenly spaced on deep models)


def start_vectors(signals=SIGNALS) -> tuple[Scorer, ...]:
    """STARTS whose one non-zero weight is on a signal of `signals` (order kept); if none is, the
    first scorer of `weight_grid(signals)`."""
    on = [name in tuple(signals) for name in SIGNALS]
    grid = weight_grid(signals)
    out = tuple(s for s in STARTS if all(on[i] or s.weights[i] == 0 for i in range(len(SIGNALS))) and s in grid)
    return out or grid[:1]


def weight_grid(signals=SIGNALS) -> tuple[Scorer, ...]:
    """W_GRID restricted to `signals` (the others' weights fixed at 0; all-zero vectors and
    duplicates dropped, order kept; max-min only with diversity). All four signals -> W_GRID."""
    sig = tuple(signals)
    bad = [x for x in sig if x not in SIGNALS]
    if bad or not sig:
        raise UserError(f"--signals: {', '.join(bad) or 'none given'}: choose from {', '.join(SIGNALS)}")
    on = [name in sig for name in SIGNALS]
    out: list[Scorer] = []
    for s in W_GRID:
        if s.select == "maxmin":  # the diversity signal's set form
            if "diversity" in sig:
                out.append(s)
            continue
        r = tuple(float(x) if on[i] else 0.0 for i, x in enumerate(s.weights))
        if sum(r) > 0 and Scorer(r) not in out:
            out.append(Scorer(r))
    return tuple(out)


def layer_grid(num_layers: int, n_visual: int, budget: float, size: int = MAX_LAYER_GRID, early: int = 4) -> list[int]:
    """Candidate stage layers: every layer on models of <= `size` layers; on deeper ones `size`
    evenly spaced layers plus `early` evenly spaced over the early layers at which a first stage
    can still meet the budget (l < budget * L). Infeasible shapes are dropped later."""
    if num_layers <= size:
        return list(range(num_layers))
    step = num_layers / size
    grid = {int(round(i * step)) for i in range(size)}
    last = max(0, math.ceil(budget * num_layers) - 1)
    grid |= {int(round(i * last / max(1, early - 1))) for i in range(early)}
    return sorted(grid)


def shape_candidates(num_layers: int, n_visual: int, budget: float, grid=None, ratios=R_SHAPES,
                     max_stages: int = MAX_STAGES):
    """Phase A shapes, in a fixed order: (layers, ratio, keeps). `grid`: the stage layers
    (default `layer_grid`)."""
    grid = layer_grid(num_layers, n_visual, budget) if grid is None else grid
    out = []
    for s in range(1, max_stages + 1):
        for layers in combinations(grid, s):
            for r in (1.0,) if s == 1 else ratios:
                keeps = geometric_keeps(layers, r, n_visual, num_layers, budget)
                if keeps is None or keeps[0] >= n_visual:
                    continue
                # a stage that keeps as many as the previous one is a no-op: drop such shapes
                if any(keeps[j] == keeps[j - 1] for j in range(1, s)):
                    continue
                out.append((tuple(layers), r, tuple(keeps)))
    return out
