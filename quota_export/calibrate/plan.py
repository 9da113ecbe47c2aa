"""How much of the search space a calibration can afford: the search's work, counted in reference passes.

Every candidate runs the decoder from its first stage layer to the last one on the kept tokens of
the samples it is measured on, so its cost is known before it runs: the multiply-adds of those
token-layers (the layer's linears plus its attention over the tokens present). One reference pass
(every calibration sample through the unpruned model) is the unit.

    Cost      the estimate: `candidate(stages, samples)`, `pass_work`
    Plan      the search's space: phase A's layer grid, starts, decay ratios and stage count; the
              weight grid and sweeps of phase B; the ratios of phase C; the finalists
    choose()  the full space (today's search, `Plan.full`) whenever its work fits in
              max(SCREEN_PASSES + EXACT_PASSES reference passes, FLOOR); otherwise the largest of the smaller
              spaces (LADDER) whose phase A fits in A_SHARE of the screened allowance, with
              phases B and C stopped when the rest of it is spent and as many finalists as
              EXACT_PASSES passes of the objective hold

Everything here is a function of the model's geometry, the budget and the calibration prompts'
lengths: the same inputs give the same plan on any machine and with any number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quota_export.calibrate.space import (
    FINALISTS,
    MAX_STAGES,
    R_FINE,
    R_SHAPES,
    W_GRID,
    Scorer,
    layer_grid,
    screen_size,
    shape_candidates,
    start_vectors,
    weight_grid,
)
from quota_export.prune.schedule import kept_per_layer

# The search's work allowance: max(SCREEN_PASSES + EXACT_PASSES passes, FLOOR multiply-adds). FLOOR
# is ~3x what the full search needs on the shipped model with 128 samples (a few minutes on one
# core here), so small models always search the whole space; the passes are what a deep model gets
# (a cut plan screens in fp32 reductions, ~20 % cheaper a layer than the estimate assumes).
FLOOR = 1.0e13
SCREEN_PASSES = 1.25  # screened candidates (phases A-C) of a cut search
EXACT_PASSES = 0.75  # its finalists, measured on the objective
A_SHARE = 0.6  # of the screened allowance, at most this for phase A (the rest: B and C)
# Smaller phase-A spaces, largest first: (evenly spaced layers, early layers, starts, decay ratios,
# stages). The starts are taken in START_ORDER.
LADDER = (
    (6, 3, 4, R_SHAPES, 3),
    (5, 3, 3, R_SHAPES, 3),
    (4, 2, 2, R_SHAPES, 3),
    (4, 2, 2, (0.5,), 2),
    (3, 2, 1, (0.5,), 2),
    (2, 1, 1, (0.5,), 2),
)
# starts of a cut search, by preference: the attention-only scorer (the naive schedule's), the
# diversity-only one (the shipped model's first and last stages), max-min, magnitude-only
START_ORDER = ((0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), "maxmin", (1.0, 0.0, 0.0, 0.0))
# phase B of a cut search: each stage tries these vectors (one sweep), the start's own first
B_SMALL = ((0.0, 1.0, 0.0, 1.0), (0.5, 1.0, 0.0, 0.0), (0.0, 1.0, 1.0, 0.0), (0.0, 0.0, 0.5, 1.0))
FINE_SMALL = (0.7, 0.35)  # phase C of a cut search


class Cost:
    """Multiply-adds of the decoder on calibration prompts of lengths `lengths` (N visual tokens
    each): a token through layer l costs the layer's linears plus its attention over the tokens
    present there."""

    def __init__(self, spec, n_visual: int, lengths: list[int]):
        self.L, self.N = spec.num_layers, n_visual
        self.lengths = list(lengths)
        self.T = sum(self.lengths) / max(1, len(self.lengths))  # mean prompt length
        q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        self.linear = spec.hidden * (2 * q + 2 * kv) + 3 * spec.hidden * spec.intermediate
        self.att = 2 * q  # per token and token present: q k^T and the weighted sum of v

    def _layer(self, tokens: float) -> float:
        return tokens * (self.linear + self.att * tokens)

    @property
    def pass_work(self) -> float:
        """One reference pass over all samples."""
        return sum(self.L * self._layer(T) for T in self.lengths)

    def candidate(self, layers, keeps, samples: int) -> float:
        """A candidate (stages at `layers` keeping `keeps`) on `samples` samples of the mean length:
        from its first stage layer to the last layer (the states before come from disk)."""
        if not layers:
            return 0.0
        text = self.T - self.N
        kept = kept_per_layer(layers, keeps, self.N, self.L)
        return samples * sum(self._layer(text + kept[l]) for l in range(layers[0], self.L))


@dataclass(frozen=True)
class Plan:
    grid: tuple[int, ...]  # phase A's stage layers (the reference pass keeps their inputs)
    starts: tuple[Scorer, ...]  # phase A's scorers
    ratios: tuple[float, ...]  # phase A's decay ratios (shapes of >= 2 stages)
    max_stages: int
    b_grid: tuple[Scorer, ...] | None  # phase B's vectors (None: the whole weight grid)
    sweeps: int  # phase B's coordinate-descent sweeps at most
    fine: tuple[float, ...]  # phase C's decay ratios
    finalists: int
    full: bool  # the whole space (no allowance: B and C run to the end; finalists as search.py says)
    screen_allowance: float = math.inf  # multiply-adds of screened candidates (A-C) at most
    passes: float = 0.0  # the reference pass (the unit of the allowances), multiply-adds

    def shapes(self, num_layers: int, n_visual: int, budget: float):
        return shape_candidates(num_layers, n_visual, budget, self.grid, self.ratios, self.max_stages)

    def describe(self) -> str:
        """One line for the recipe's notes (cut searches only)."""
        return (f"search cut to fit {SCREEN_PASSES:g} + {EXACT_PASSES:g} reference passes: phase A on layers "
                f"{list(self.grid)}, {len(self.starts)} start(s), <= {self.max_stages} stages; "
                f"{self.finalists} finalist(s)")


def _starts(signals, n: int) -> tuple[Scorer, ...]:
    avail = start_vectors(signals)
    pref = [s for key in START_ORDER for s in avail
            if (s.select == "maxmin" if key == "maxmin" else s.select == "topk" and s.weights == key)]
    pref += [s for s in avail if s not in pref]
    return tuple(pref[:n])


def full_plan(num_layers: int, n_visual: int, budget: float, signals) -> Plan:
    return Plan(tuple(layer_grid(num_layers, n_visual, budget)), start_vectors(signals), R_SHAPES, MAX_STAGES,
                None, 3, R_FINE, FINALISTS, True)


def choose(spec, n_visual: int, lengths: list[int], budget: float, signals) -> Plan:
    """The plan of a calibration (module doc). Deterministic in its inputs."""
    L, N = spec.num_layers, n_visual
    cost = Cost(spec, N, lengths)
    m = screen_size(len(lengths))
    P = cost.pass_work
    full = full_plan(L, N, budget, signals)
    if _full_work(full, cost, m, budget) <= max((SCREEN_PASSES + EXACT_PASSES) * P, FLOOR):
        return full
    allowance = SCREEN_PASSES * P
    grid = weight_grid(signals)
    b_grid = tuple(s for s in (Scorer(w) for w in B_SMALL) if s in grid)
    chosen = None
    for size, early, n_starts, ratios, stages in LADDER:
        plan = Plan(tuple(layer_grid(L, N, budget, size, early)), _starts(signals, n_starts), ratios, stages,
                    b_grid, 1, FINE_SMALL, 1, False, allowance, P)
        shapes = plan.shapes(L, N, budget)
        work = len(plan.starts) * sum(cost.candidate(ls, ks, m) for ls, _, ks in shapes)
        chosen = plan
        if shapes and work <= A_SHARE * allowance:
            break
    shapes = chosen.shapes(L, N, budget)
    worst = max((cost.candidate(ls, ks, len(lengths)) for ls, _, ks in shapes), default=0.0)
    finalists = max(1, min(FINALISTS, int(EXACT_PASSES * P // worst) if worst > 0 else FINALISTS))
    return Plan(chosen.grid, chosen.starts, chosen.ratios, chosen.max_stages, chosen.b_grid, chosen.sweeps,
                chosen.fine, finalists, False, allowance, P)


def _full_work(plan: Plan, cost: Cost, m: int, budget: float) -> float:
    """The full search's work, estimated: phase A exactly; B as one sweep of the whole grid over the
    stages of the costliest shape, C as R_FINE, from each start; 3 x FINALISTS exact finalists."""
    shapes = plan.shapes(cost.L, cost.N, budget)
    if not shapes:
        return 0.0
    a = len(plan.starts) * sum(cost.candidate(ls, ks, m) for ls, _, ks in shapes)
    ls, _, ks = max(shapes, key=lambda s: cost.candidate(s[0], s[2], 1))
    one = cost.candidate(ls, ks, 1)
    bc = len(plan.starts) * (MAX_STAGES * len(W_GRID) + len(R_FINE)) * one * m
    return a + bc + 3 * FINALISTS * one * len(cost.lengths)

