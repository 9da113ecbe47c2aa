"""QUOTA calibration: calibration data through the model as deployed -> schedule -> Recipe.

The objective and the search (docs/design.md §4, docs/calibration.md): everything is measured
under the deployed quantizers (`Deployed` built from the scheme, RTN weights), prefill only.

    samples --embed--> h_0 --quantized unpruned prefill--> h_l (input of every layer l, cached),
                                                          p_ref = softmax(logits)
    candidate = stages [(layer, keep, (w_m, w_a, w_r, w_d))]; the all-zero vector MAXMIN stands
                for a max-min stage (`select_of`)
    sigma_j = std of each signal over the calibration tokens stage j sees (stages < j applied)
    D(candidate) = mean over samples of KL(p_ref || p_pruned) at the first answer position

    search (deterministic; ties -> the earlier candidate in the fixed enumeration order):
      A. shapes x starts: 1-3 stages at layers from a grid, geometric keeps, each stage scored by a
         single-signal start (STARTS) or max-min selection
      B. weights, from each start's best shape: coordinate descent over W_GRID (<= 3 sweeps)
      C. keeps: that shape's layers with the decay ratios of R_FINE; the lowest end wins

`signals` restricts which signals may get a non-zero weight (ablations: `weight_grid`,
`start_vectors`). A candidate runs from its first stage layer on the cached h_l; within a batch
of candidates, states and signals shared by a common stage prefix are computed once. The fast
path equals `Deployed.prefill` with the same stages bit for bit (tests/test_calibrate.py).
Budget: mean_l kept_l <= budget * N over all decoder layers. With `weights="gptq"`, GPTQ is
then calibrated on the chosen schedule's streams (gptq_calibrate.py) and written beside the
recipe (qweights.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch

from quota_export import UserError, versions
from quota_export.prune.schedule import budget_cap, geometric_keeps, total_kept  # noqa: F401
from quota_export.recipe import SIGNALS  # the order of a weight vector's entries

# (w_m, w_a, w_r, w_d): attention-only first, so that ties keep the simplest scorer; the
# vectors with a diversity weight come last, so that ties keep the earlier three-signal scorers
W_GRID: tuple[tuple[float, float, float, float], ...] = (
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
)
# A stage whose weight vector is all zero selects by greedy max-min diversity instead of a score
# (`select: maxmin`, Deployed.maxmin_score): DivPrune's set selection on the deployed model's own
# codes. It is tried wherever a weight vector is at a stage on layer 0 (last, so ties keep the
# scorers); deeper stages cannot take it (recipe.Stage: float noise in the graphs' hidden states
# can flip an activation code there, and a greedy set selection has no score grid to absorb it).
# It belongs to the diversity signal (ablations without diversity drop it).
MAXMIN: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
W_GRID = W_GRID + (MAXMIN,)
# phase A's single-signal scorers, in order: attention-only first (ties keep it, as before)
STARTS: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 1.0, 0.0, 0.0),
    (1.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 1.0),
    MAXMIN,
)


def select_of(w) -> str:
    """The recipe's `select` for a candidate stage's weight vector."""
    return "maxmin" if tuple(w) == MAXMIN else "topk"
R_SHAPES = (0.6, 0.35)  # decay ratios of the shape search (stages >= 2)
R_FINE = (0.8, 0.7, 0.6, 0.5, 0.35, 0.25)  # decay ratios tried in phase C
MAX_STAGES = 3
MAX_LAYER_GRID = 8  # at most this many candidate stage layers (evenly spaced on deep models)
SIG_DIGITS = 6


def _sig(x: float, digits: int = SIG_DIGITS) -> float:
    return float(f"{x:.{digits}g}")


def start_vectors(signals=SIGNALS) -> tuple[tuple[float, float, float, float], ...]:
    """STARTS whose one non-zero weight is on a signal of `signals` (order kept); if none is, the
    first vector of `weight_grid(signals)`."""
    on = [name in tuple(signals) for name in SIGNALS]
    grid = weight_grid(signals)
    out = tuple(w for w in STARTS if all(on[i] or w[i] == 0 for i in range(len(SIGNALS))) and w in grid)
    return out or grid[:1]


def weight_grid(signals=SIGNALS) -> tuple[tuple[float, float, float, float], ...]:
    """W_GRID restricted to `signals` (the others' weights fixed at 0; all-zero vectors and
    duplicates dropped, order kept). All four signals -> W_GRID unchanged."""
    sig = tuple(signals)
    bad = [x for x in sig if x not in SIGNALS]
    if bad or not sig:
        raise UserError(f"--signals: {', '.join(bad) or 'none given'}: choose from {', '.join(SIGNALS)}")
    on = [name in sig for name in SIGNALS]
    out: list[tuple[float, float, float, float]] = []
    for w in W_GRID:
        if w == MAXMIN:  # max-min selection: the diversity signal's set form
            if "diversity" in sig:
                out.append(w)
            continue
        r = tuple(float(x) if on[i] else 0.0 for i, x in enumerate(w))
        if sum(r) > 0 and r not in out:
            out.append(r)
    return tuple(out)


# ---------------------------------------------------------------- budget arithmetic


def layer_grid(num_layers: int, n_visual: int, budget: float) -> list[int]:
    """Candidate stage layers: every layer on models of <= MAX_LAYER_GRID layers; on deeper ones
    MAX_LAYER_GRID evenly spaced layers plus 4 evenly spaced over the early layers at which a
    first stage can still meet the budget (l < budget * L). Infeasible shapes are dropped later."""
    if num_layers <= MAX_LAYER_GRID:
        return list(range(num_layers))
    step = num_layers / MAX_LAYER_GRID
    grid = {int(round(i * step)) for i in range(MAX_LAYER_GRID)}
    early = max(0, math.ceil(budget * num_layers) - 1)
    grid |= {int(round(i * early / 3)) for i in range(4)}
    return sorted(grid)


def shape_candidates(num_layers: int, n_visual: int, budget: float):
    """Phase A shapes, in a fixed order: (layers, ratio, keeps)."""
    grid = layer_grid(num_layers, n_visual, budget)
    out = []
    for s in range(1, MAX_STAGES + 1):
        for layers in combinations(grid, s):
            for r in (1.0,) if s == 1 else R_SHAPES:
                keeps = geometric_keeps(layers, r, n_visual, num_layers, budget)
                if keeps is None or keeps[0] >= n_visual:
                    continue
                # a stage that keeps as many as the previous one is a no-op: drop such shapes
                if any(keeps[j] == keeps[j - 1] for j in range(1, s)):
                    continue
                out.append((tuple(layers), r, tuple(keeps)))
    return out


# ---------------------------------------------------------------- calibration samples


def select_samples(path: str | Path, samples: int, seed: int):
    """`samples` of the file's samples, task-balanced, chosen by `seed`: each task's samples are
    shuffled by random.Random(seed), then taken round-robin over tasks (in order of first
    appearance); returned in file order."""
    from quota_export.data import load_bench

    allv = load_bench(path)
    if samples >= len(allv):
        return allv
    rng = random.Random(int(seed))
    by_task: dict[str, list[int]] = {}
    for i, s in enumerate(allv):
        by_task.setdefault(s.task, []).append(i)
    for idx in by_task.values():
        rng.shuffle(idx)
    chosen, rnd = [], 0
    while len(chosen) < samples:
        for idx in by_task.values():
            if rnd < len(idx) and len(chosen) < samples:
                chosen.append(idx[rnd])
        rnd += 1
    return [allv[i] for i in sorted(chosen)]


# ---------------------------------------------------------------- the fast evaluator


@dataclass
class _Sample:
    hs: list[torch.Tensor]  # unpruned input of each layer [1, T, D]
    pos: torch.Tensor
    start: int
    n: int
    ref_logp: torch.Tensor  # [V] float64 log-probs of the quantized unpruned model


@dataclass
class _Entry:
    """All samples' state at the input of a stage's layer (earlier stages applied), with the
    signals the stage scores there and their calibration statistics."""

    states: list[tuple]  # per sample (h, pos, n, merged-token counts or None)
    signals: list[tuple]  # per sample (mag, att, risk, div), each [1, n]
    sigma: tuple[float, ...]  # per signal: std over all samples' tokens, SIG_DIGITS digits (1 if constant)
    constant: tuple[bool, ...]  # which signals are constant (their weight is irrelevant)


def kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(p_ref || softmax(logits)) in nats (float64)."""
    lp = torch.log_softmax(logits.double().flatten(), dim=-1)
    return float((ref_logp.exp() * (ref_logp - lp)).sum())


def _stats(signals: list[tuple]):
    sigma, const = [], []
    for k in range(len(SIGNALS)):
        x = torch.cat([s[k].flatten() for s in signals]).double()
        sd = float(x.std()) if x.numel() > 1 else 0.0
        c = not sd > 1e-12 * max(1.0, float(x.abs().max()) if x.numel() else 1.0)
        sigma.append(1.0 if c else _sig(sd))
        const.append(c)
    return tuple(sigma), tuple(const)


class Evaluator:
    """Caches the unpruned quantized stream of the calibration samples; measures candidates.

    A candidate is a tuple of stages (layer, keep, (w_m, w_a, w_r, w_d)) (MAXMIN: max-min selection). Stage j's sigma is the std
    of each signal over the calibration tokens present at its layer in the stream it really
    sees (stages before it applied), so it depends on the candidate's prefix: `stage_sigmas`.
    """

    CHUNK = 16  # candidates per batch sharing one prefix memo (bounds memory)

    def __init__(self, dep, prompts, progress: bool = False):
        from tqdm import tqdm

        self.dep = dep
        self.L = dep.spec.num_layers
        self.samples: list[_Sample] = []
        self.cache: dict[tuple, float] = {}
        self.sigma_cache: dict[tuple, tuple] = {}  # (prefix, layer) -> (sigma, constant)
        self.evals = 0
        with torch.no_grad():
            for p in tqdm(prompts, desc="calibrate: reference", disable=not progress, unit="sample"):
                h = dep.embed_prompt(p)
                pos = p.positions()
                hs = []
                for l in range(self.L):
                    hs.append(h)
                    h, _ = dep.layer(l, h, pos)
                ref = torch.log_softmax(dep.head(h).double().flatten(), dim=-1)
                self.samples.append(_Sample(hs, pos, p.visual_start, p.n_visual, ref))
        self.n_visual = self.samples[0].n if self.samples else 0

    @torch.no_grad()
    def _entry(self, prefix: tuple, layer: int, memo: dict) -> _Entry:
        key = (prefix, layer)
        if key in memo:
            return memo[key]
        if not prefix:
            states = [(s.hs[layer], s.pos, s.n, None) for s in self.samples]
        else:
            parent = self._entry(prefix[:-1], prefix[-1][0], memo)
            states = [self._advance(smp, st, sg, parent.sigma, prefix[-1], layer)
                      for smp, st, sg in zip(self.samples, parent.states, parent.signals)]
        signals = [self.dep.signals(layer, h, pos, smp.start, n, self.dep.key_bias(cnt, smp.start))
                   for smp, (h, pos, n, cnt) in zip(self.samples, states)]
        sigma, const = _stats(signals)
        self.sigma_cache[key] = (sigma, const)
        memo[key] = e = _Entry(states, signals, sigma, const)
        return e

    def _advance(self, smp: _Sample, state, signals, sigma, stage, to_layer: int):
        """Prune `state` at `stage` (scored from `signals`), then run its layer .. to_layer - 1."""
        from quota_export.ops.gather import stable_topk
        from quota_export.ops.maxmin import maxmin_score
        from quota_export.ops.signals import stage_score

        h, pos, n, cnt = state
        layer, keep, w = stage
        start = smp.start
        if w == MAXMIN:
            idx = stable_topk(maxmin_score(self.dep.cosine(layer, h, pos, start, n), keep), keep)
        else:
            idx = stable_topk(stage_score(w, sigma, *signals), keep)
        if self.dep.cfg.merge:
            cnt = self.dep.merge_counts(layer, h, pos, idx, start, n, torch.ones(n, dtype=torch.float64) if cnt is None else cnt)
        bias = self.dep.key_bias(cnt, start)
        h, pos, pre = self.dep.prune_stage(layer, h, pos, idx, start, n)
        for l in range(layer, to_layer):
            h, _ = self.dep.layer(l, h, pos, pre if l == layer else None, bias)
        return h, pos, keep, cnt

    def stage_sigmas(self, cand: tuple) -> list[tuple[float, ...]]:
        """The sigma of each stage of a candidate (measured on the stream that stage sees)."""
        out = []
        for j, st in enumerate(cand):
            key = (cand[:j], st[0])
            if key not in self.sigma_cache:
                self._entry(cand[:j], st[0], {})
            out.append(self.sigma_cache[key][0])
        return out

    def constant(self, prefix: tuple, layer: int) -> tuple[bool, ...]:
        key = (prefix, layer)
        if key not in self.sigma_cache:
            self._entry(prefix, layer, {})
        return self.sigma_cache[key][1]

    @torch.no_grad()
    def divergence(self, cands: list[tuple], bar=None) -> list[float]:
        """Mean KL for each candidate; cached across calls."""
        todo = [c for c in dict.fromkeys(cands) if c not in self.cache]
        for i in range(0, len(todo), self.CHUNK):
            memo: dict = {}
            for c in todo[i : i + self.CHUNK]:
                if not c:
                    self.cache[c] = 0.0
                else:
                    e = self._entry(c[:-1], c[-1][0], memo)
                    tot = 0.0
                    for smp, st, sg in zip(self.samples, e.states, e.signals):
                        h = self._advance(smp, st, sg, e.sigma, c[-1], self.L)[0]
                        tot += kl(smp.ref_logp, self.dep.head(h))
                    self.cache[c] = tot / len(self.samples)
                self.evals += 1
                if bar is not None:
                    bar.update()
        return [self.cache[c] for c in cands]


# ---------------------------------------------------------------- search


@dataclass
class SearchResult:
    stages: tuple  # of (layer, keep, (w_m, w_a, w_r, w_d))
    sigmas: list  # per stage (sigma_m, sigma_a, sigma_r, sigma_d)
    divergence: float
    naive_divergence: float
    evals: int
    num_layers: int
    weights: tuple | None = None  # (GPTQResult, file metadata) with weights="gptq"


def naive_stages(n_visual: int, budget: float) -> tuple:
    """One attention-only stage at layer 0 keeping floor(budget * N): the reference point."""
    k = max(1, int(math.floor(budget * n_visual + 1e-9)))
    return ((0, k, W_GRID[0]),)


def _best(cands, divs):
    """Lowest divergence; ties -> the earliest candidate."""
    i = min(range(len(cands)), key=lambda i: (divs[i], i))
    return cands[i], divs[i]


def search(ev: Evaluator, budget: float, progress: bool = False, signals=SIGNALS) -> SearchResult:
    from tqdm import tqdm

    grid = weight_grid(signals)
    N, L = ev.n_visual, ev.L
    naive = naive_stages(N, budget)
    if budget_cap(budget, N, L) >= N * L:  # no pruning needed
        return SearchResult((), [], 0.0, 0.0, 0, L)

    def build(layers, keeps, ws):
        return tuple(zip(layers, keeps, ws))

    def weight_options(cand, j):
        """The grid without vectors equivalent to an earlier one: a constant signal's weight is moot,
        and a positive factor on all weights keeps the ranking."""
        const = ev.constant(cand[:j], cand[j][0])
        seen, out = set(), []
        for w in grid:
            if w == MAXMIN:
                if cand[j][0] == 0:
                    out.append(w)
                continue
            eff = tuple(0.0 if const[i] else w[i] for i in range(len(SIGNALS)))
            top = max(eff)
            if top == 0:
                continue
            eff = tuple(x / top for x in eff)
            if eff in seen:
                continue
            seen.add(eff)
            out.append(w)
        return out

    shapes = shape_candidates(L, N, budget)
    if not shapes:
        raise UserError(f"budget {budget}: no schedule of {N} visual tokens over {L} layers meets it")
    starts = start_vectors(signals)
    bar = tqdm(desc="calibrate: search", disable=not progress, unit="cand", total=len(shapes) * len(starts) + 1)
    ev.divergence([naive], bar)
    # A. shapes x single-signal starts (start-major)
    # (the max-min start scores stages after layer 0 with the grid's first vector)
    cands = [build(ls, ks, [grid[0] if w == MAXMIN and l > 0 else w for l in ls]) for w in starts
             for ls, _, ks in shapes]
    divs = ev.divergence(cands, bar)

    def refine(best, best_d):
        """B. weights: coordinate descent over the stages; C. keeps: other decay ratios for the
        chosen layers."""
        layers = [s[0] for s in best]
        keeps = [s[1] for s in best]
        ws = [s[2] for s in best]
        for _sweep in range(3):
            changed = False
            for j in range(len(ws)):
                cands = [build(layers, keeps, ws[:j] + [w] + ws[j + 1 :]) for w in weight_options(best, j)]
                bar.total += len(cands)
                c, d = _best(cands, ev.divergence(cands, bar))
                if d < best_d and c != best:
                    best, best_d, ws, changed = c, d, [s[2] for s in c], True
            if not changed:
                break
        if len(layers) > 1:
            cands = [best]
            for r in R_FINE:
                ks = geometric_keeps(layers, r, N, L, budget)
                if ks is not None and all(ks[j] < ks[j - 1] for j in range(1, len(ks))) and ks[0] < N:
                    cands.append(build(layers, ks, ws))
            bar.total += len(cands)
            best, best_d = _best(cands, ev.divergence(cands, bar))
        return best, best_d

    # B + C from each start's best shape; the lowest end wins (ties -> the earlier start)
    n = len(shapes)
    ends = [refine(*_best(cands[i * n : (i + 1) * n], divs[i * n : (i + 1) * n])) for i in range(len(starts))]
    best, best_d = _best([e[0] for e in ends], [e[1] for e in ends])
    bar.close()
    return SearchResult(best, ev.stage_sigmas(best), best_d, ev.cache[naive], ev.evals, L)


# ---------------------------------------------------------------- entry point


def default_name(model: str | Path, scheme: str, budget: float) -> str:
    import re

    base = re.sub(r"[^A-Za-z0-9._-]", "-", Path(str(model)).resolve().name or "model").lstrip("._-") or "model"
    return f"{base}-quota-{scheme}-b{budget:g}"


def calibrate(model: str | Path, data: str | Path, budget: float, scheme: str = "w4a4kv4", samples: int = 64,
              seed: int = 0, name: str | None = None, progress: bool = False, group_size: int | None = None,
              weights: str = "rtn", signals=SIGNALS, merge: str = "proportional"):
    """Run QUOTA; returns (Recipe, SearchResult).

    `signals`: which of magnitude/attention/risk/diversity may get a non-zero score weight
    (ablations; default all four, the full method). `merge`: "proportional" (the full method:
    dropped tokens are merged into their most similar kept token, docs/design.md §4) or "none" (ablation).

    Same model, data, budget, scheme, samples and seed -> the same recipe bytes: the search has
    no randomness but the seeded sample choice, ties go to the earlier candidate, measured
    constants are rounded to SIG_DIGITS digits, and torch runs on one thread meanwhile (so the
    float reductions do not depend on the machine's core count).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _calibrate(model, data, budget, scheme, samples, seed, name, progress, group_size, weights, signals,
                          merge)
    finally:
        torch.set_num_threads(threads)


def _calibrate(model, data, budget, scheme, samples, seed, name, progress, group_size=None, weights="rtn",
               signals=SIGNALS, merge="proportional"):
    from quota_export import models
    from quota_export.data import load_image
    from quota_export.recipe import (
        SCHEMES,
        Calibration,
        Pruning,
        Quant,
        Recipe,
        ScoreSigma,
        ScoreWeights,
        Stage,
    )
    from quota_export.reference import DeployConfig, Deployed

    if scheme not in SCHEMES:
        raise UserError(f"--scheme: unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise UserError(f"--budget: {budget} must be in (0, 1]")
    if samples < 1:
        raise UserError(f"--samples: {samples} must be >= 1")
    if weights not in ("rtn", "gptq"):
        raise UserError(f"--weights: {weights!r} must be rtn or gptq")
    if merge not in ("proportional", "none"):
        raise UserError(f"--merge: {merge!r} must be proportional or none")
    weight_grid(signals)  # validates
    restricted = [x for x in SIGNALS if x in tuple(signals)] != list(SIGNALS)
    if weights == "gptq" and SCHEMES[scheme].weights.bits == 16:
        raise UserError(f"--weights gptq: scheme {scheme} leaves the weights unquantized")
    adapter = models.load(model)
    spec = adapter.decoder_spec()
    N = adapter.n_visual()
    update = {}
    if group_size is not None:  # e.g. 64 or 128: the INT4 block sizes TensorRT accepts
        if group_size <= 0 or group_size & (group_size - 1):
            raise UserError(f"--group-size: must be a positive power of two, got {group_size}")
        update["group_size"] = group_size
    ignore = adapter.default_ignore()
    if ignore != SCHEMES[scheme].weights.ignore:  # the family's own safe defaults (e.g. Qwen's model.visual)
        update["ignore"] = list(ignore)
    if update:
        quant = Quant(scheme=scheme, weights=SCHEMES[scheme].weights.model_copy(update=update))
    else:
        quant = Quant(scheme=scheme)
    probe = Recipe(name="probe", model=str(model), quant=quant,
                   pruning=Pruning(budget=1.0, n_visual=N, stages=[], merge=merge))
    probe.check_against(spec.num_layers, N, adapter.module_names())
    cfg = DeployConfig.from_recipe(probe)
    if cfg.weights.algorithm != "rtn":
        raise UserError("calibrate: only rtn weight quantization is implemented")
    dep = Deployed(adapter, cfg)
    chosen = select_samples(data, samples, seed)
    prompts = [adapter.prompt(load_image(s), s.question) for s in chosen]
    ev = Evaluator(dep, prompts, progress)
    res = search(ev, float(budget), progress, signals)
    stages = [
        Stage(layer=l, keep=k, fraction=_sig(k / N), select=select_of(w),
              weights=ScoreWeights(**dict(zip(SIGNALS, w))), sigma=ScoreSigma(**dict(zip(SIGNALS, s))))
        for (l, k, w), s in zip(res.stages, res.sigmas)
    ]
    recipe = Recipe(
        name=name or default_name(model, scheme, budget),
        model=str(model),
        quant=quant,
        pruning=Pruning(budget=float(budget), n_visual=N, stages=stages, method="quota", merge=merge),
        calibration=Calibration(
            data=str(data),
            samples=len(chosen),
            seed=int(seed),
            method="quota",
            divergence=_sig(res.divergence),
            versions=versions(),
            notes=(f"KL(quantized unpruned || quantized pruned) at the first answer position, mean over "
                   f"samples; naive schedule (one attention-only stage at layer 0) {_sig(res.naive_divergence)}; "
                   f"{res.evals} candidates evaluated"
                   + (f"; ablation: score weights restricted to {', '.join(x for x in SIGNALS if x in signals)}"
                      if restricted else "")
                   + ("; ablation: no merging of dropped tokens" if merge == "none" else "")),
        ),
    )
    recipe.check_against(spec.num_layers, N, adapter.module_names())
    if weights == "gptq":
        recipe = _with_gptq(recipe, res, adapter, dep, prompts, progress)
    return recipe, res


def _with_gptq(recipe, res, adapter, dep, prompts, progress):
    """GPTQ on the chosen schedule's streams: the recipe with `algorithm: gptq` (res.weights set)."""
    from quota_export.gptq_calibrate import gptq_weights
    from quota_export.qweights import weight_meta
    from quota_export.recipe import Quant
    from quota_export.reference import DeployConfig

    wq = recipe.quant.resolved().weights.model_copy(update={"algorithm": "gptq"})
    recipe = recipe.model_copy(update={"quant": Quant(scheme=recipe.quant.scheme, weights=wq)}, deep=True)
    cfg = DeployConfig.from_recipe(recipe)
    g = gptq_weights(adapter, cfg, wq, prompts, base=dep.qweights, progress=progress)
    c = recipe.calibration
    meta = weight_meta(wq, cfg.a_bits, adapter, sorted(g.qweights), calibrated_on={
        "data": c.data, "samples": c.samples, "seed": c.seed,
        "schedule": [[s.layer, s.keep] for s in recipe.pruning.stages]})
    notes = (f"{c.notes}; weights: GPTQ layer by layer on the pruned, quantized streams of the calibration "
             f"samples, output error GPTQ/RTN {_sig(g.error_ratio(), 4)} per layer")
    res.weights = (g, meta)
    return recipe.model_copy(update={"calibration": c.model_copy(update={"notes": notes})})
