"""The QUOTA schedule search (deterministic; ties -> the earlier candidate in a fixed order).

    A. shapes x starts: 1-3 stages at layers from a grid, geometric keeps, each stage scored by a
       single-signal start (STARTS) or max-min selection (a max-min start scores stages after
       layer 0 with the grid's first scorer)
    B. weights, from each start's best shape: coordinate descent over the grid (<= 3 sweeps)
    C. keeps: that shape's layers with the decay ratios of R_FINE
    D. finalists: A-C rank candidates on the evaluator's screen (a proxy, evaluator.py); the
       starts' ends, phase A's FINALISTS best and the FINALISTS best screened of all are measured
       on the objective itself (`exact`), and the lowest wins

How much of this space is searched is the `Plan`'s (plan.py): all of it unless its work exceeds
the allowance counted in reference passes; a cut plan screens in fp32 reductions, has a smaller
phase A, refines the starts in the order of their phase-A best (B: one sweep of a few vectors, C:
two ratios) until its screened allowance is spent, and measures its `finalists` best screened
candidates exactly; the naive schedule (already measured exactly) is a finalist too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quota_export import UserError
from quota_export.calibrate.evaluator import Evaluator
from quota_export.calibrate.plan import Cost, Plan, full_plan
from quota_export.calibrate.space import (
    FINALISTS,
    W_GRID,
    Candidate,
    CandStage,
    screen_size,
    weight_grid,
)
from quota_export.prune.schedule import budget_cap, geometric_keeps
from quota_export.recipe import SIGNALS


@dataclass
class SearchResult:
    stages: Candidate
    sigmas: list  # per stage (sigma_m, sigma_a, sigma_r, sigma_d)
    divergence: float
    naive_divergence: float
    evals: int  # candidates measured (screened + exact)
    num_layers: int
    weights: tuple | None = None  # (GPTQResult, file metadata) with weights="gptq"


def naive_stages(n_visual: int, budget: float) -> tuple:
    """One attention-only stage at layer 0 keeping floor(budget * N): the reference point."""
    k = max(1, int(math.floor(budget * n_visual + 1e-9)))
    return (CandStage(0, k, W_GRID[0]),)


def _best(cands, divs):
    """Lowest divergence; ties -> the earliest candidate."""
    i = min(range(len(cands)), key=lambda i: (divs[i], i))
    return cands[i], divs[i]


def search(ev: Evaluator, budget: float, progress: bool = False, signals=SIGNALS, plan: Plan | None = None
           ) -> SearchResult:
    from tqdm import tqdm

    grid = weight_grid(signals)
    N, L = ev.n_visual, ev.L
    plan = full_plan(L, N, budget, signals) if plan is None else plan
    if not set(plan.grid) <= set(ev.layers):
        raise ValueError(f"plan layers {plan.grid} not kept by the reference pass ({ev.layers})")
    cost = Cost(ev.dep.spec, N, [s.T for s in ev.samples])
    exact = ev.exact
    naive = naive_stages(N, budget)
    if budget_cap(budget, N, L) >= N * L:  # no pruning needed
        return SearchResult((), [], 0.0, 0.0, 0, L)

    def build(layers, keeps, scorers) -> Candidate:
        return tuple(CandStage(*x) for x in zip(layers, keeps, scorers))

    def weight_options(cand, j):
        """The grid (the plan's B vectors, the stage's own first) without vectors equivalent to an
        earlier one: a constant signal's weight is moot, and a positive factor on all weights keeps
        the ranking."""
        const = scr.constant(cand[:j], cand[j].layer)
        seen, out = set(), []
        for w in grid if plan.b_grid is None else (cand[j].scorer, *plan.b_grid):
            if w.select == "maxmin":
                if cand[j].layer == 0:
                    out.append(w)
                continue
            eff = tuple(0.0 if const[i] else w.weights[i] for i in range(len(SIGNALS)))
            top = max(eff)
            if top == 0:
                continue
            eff = tuple(x / top for x in eff)
            if eff in seen:
                continue
            seen.add(eff)
            out.append(w)
        return out

    shapes = plan.shapes(L, N, budget)
    if not shapes:
        raise UserError(f"budget {budget}: no schedule of {N} visual tokens over {L} layers meets it")
    starts = plan.starts
    m = screen_size(len(ev.samples))
    ev.focus(naive, m, progress, plan.full)  # the screen: the samples the naive schedule disturbs most
    scr = ev.screen
    bar = tqdm(desc="calibrate: A shapes", disable=not progress, unit="cand", total=len(shapes) * len(starts) + 1)
    if progress and not plan.full:
        bar.write(f"calibrate: {plan.describe()}")
    spent = [0.0]  # screened work of B and C (cut plans stop them at the allowance)

    def affordable(cands) -> list:
        """The longest prefix of `cands` whose new candidates fit in what is left of the allowance
        (all of them with a full plan)."""
        if plan.full:
            return cands
        for i, c in enumerate(cands):
            if c in scr.cache or c in cands[:i]:
                continue
            work = cost.candidate([s.layer for s in c], [s.keep for s in c], m)
            if spent[0] + work > plan.screen_allowance - a_work:
                return cands[:i]
            spent[0] += work
        return cands

    # A. shapes x single-signal starts (start-major)
    # (the max-min start scores stages after layer 0 with the grid's first vector)
    cands = [build(ls, ks, [grid[0] if w.select == "maxmin" and l > 0 else w for l in ls]) for w in starts
             for ls, _, ks in shapes]
    a_work = sum(cost.candidate(ls, ks, m) for ls, _, ks in shapes) * len(starts)
    # the naive schedule first (measured with phase A in the workers rather than alone before it)
    divs = scr.divergence([naive] + cands, bar)[1:]
    phase_a = [cands[i] for i in sorted(range(len(cands)), key=lambda i: (divs[i], i))[:FINALISTS]]
    bar.set_description("calibrate: B-C refine")

    def refine(best, best_d):
        """B. weights: coordinate descent over the stages; C. keeps: other decay ratios for the
        chosen layers."""
        layers = [s.layer for s in best]
        keeps = [s.keep for s in best]
        ws = [s.scorer for s in best]
        for _sweep in range(plan.sweeps):
            changed = False
            for j in range(len(ws)):
                cands = affordable([build(layers, keeps, ws[:j] + [w] + ws[j + 1 :]) for w in weight_options(best, j)])
                if not cands:
                    continue
                bar.total += len(cands)
                c, d = _best(cands, scr.divergence(cands, bar))
                if d < best_d and c != best:
                    best, best_d, ws, changed = c, d, [s.scorer for s in c], True
            if not changed:
                break
        if len(layers) > 1:
            cands = [best]
            for r in plan.fine:
                ks = geometric_keeps(layers, r, N, L, budget)
                if ks is not None and all(ks[j] < ks[j - 1] for j in range(1, len(ks))) and ks[0] < N:
                    cands.append(build(layers, ks, ws))
            cands = affordable(cands)
            bar.total += len(cands)
            best, best_d = _best(cands, scr.divergence(cands, bar))
        return best, best_d

    # B + C from each start's best shape; the lowest end wins (ties -> the earlier start)
    n = len(shapes)
    firsts = [_best(cands[i * n : (i + 1) * n], divs[i * n : (i + 1) * n]) for i in range(len(starts))]
    if plan.full:
        ends = [refine(*f) for f in firsts]
    else:  # the most promising start first: the allowance may end before the others
        order = sorted(range(len(firsts)), key=lambda i: (firsts[i][1], i))
        ends = [refine(*firsts[i]) for i in order]
    # D. on the objective: the starts' ends, phase A's best shapes and the best screened candidates
    # (ties: the earlier measured), so that refinements that only won on the screen cannot crowd out
    # the shapes
    screened, vals = list(scr.cache), list(scr.cache.values())
    order = sorted(range(len(screened)), key=lambda i: (vals[i], i))
    best_screened = [screened[i] for i in order if screened[i]][:FINALISTS]
    if plan.full:
        finalists = list(dict.fromkeys([e[0] for e in ends] + phase_a + best_screened))
    else:  # and the naive schedule, measured exactly for the screen choice: the end is never worse
        finalists = list(dict.fromkeys(best_screened[: plan.finalists] + [naive]))
    bar.set_description("calibrate: D exact")
    bar.total += len(finalists) + 1
    best, best_d = _best(finalists, exact.divergence(finalists, bar))
    naive_d = exact.cache[naive]
    bar.total = bar.n  # cached candidates were counted in the total but measured no more
    bar.refresh()
    bar.close()
    evals = exact.evals + (scr.evals if scr is not exact else 0)
    return SearchResult(best, exact.stage_sigmas(best), best_d, naive_d, evals, L)
