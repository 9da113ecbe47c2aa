"""QUOTA calibration: calibration data through the model as deployed -> schedule -> Recipe.

The objective (docs/design.md §4, docs/calibration.md): D(candidate) = mean over calibration
samples of KL(p_quantized-unpruned || p_quantized-pruned) at the first answer position, every
model under the deployed quantizers (RTN weights), prefill only, under mean_l kept_l <= budget * N.

    space.py      typed candidates (CandStage, Scorer), the weight grid, the starts, the shapes
    evaluator.py  the calibration samples and the fast, prefix-sharing evaluator of D
    search.py     the deterministic search (shapes x starts, weights, keeps)
    plan.py       how much of the space the search affords (its work counted in reference passes)
    here          calibrate(): model + data -> Recipe (+ GPTQ on the chosen schedule's streams)
"""

from __future__ import annotations

from pathlib import Path

import torch

from quota_export import UserError, versions
from quota_export.calibrate.evaluator import Evaluator, kl, select_samples, sig_digits
from quota_export.calibrate.plan import Plan
from quota_export.calibrate.plan import choose as choose_plan
from quota_export.calibrate.search import SearchResult, naive_stages, search
from quota_export.calibrate.space import (
    MAXMIN,
    STARTS,
    W_GRID,
    Candidate,
    CandStage,
    Scorer,
    layer_grid,
    shape_candidates,
    start_vectors,
    weight_grid,
)
from quota_export.prune.schedule import geometric_keeps, total_kept
from quota_export.recipe import SIGNALS

WORKERS = 2  # processes measuring candidates (the recipe does not depend on it)

__all__ = ["MAXMIN", "SIGNALS", "STARTS", "W_GRID", "CandStage", "Candidate", "Evaluator", "Plan", "Scorer",
           "SearchResult", "calibrate", "choose_plan", "default_name", "geometric_keeps", "kl", "layer_grid", "naive_stages", "search",
           "select_samples", "shape_candidates", "start_vectors", "total_kept", "weight_grid"]


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
    plan = choose_plan(spec, N, [p.input_ids.shape[1] for p in prompts], float(budget), signals)
    with Evaluator(dep, prompts, progress, layers=plan.grid, workers=WORKERS) as ev:
        res = search(ev, float(budget), progress, signals, plan)
    stages = [
        Stage(layer=st.layer, keep=st.keep, fraction=sig_digits(st.keep / N), select=st.scorer.select,
              weights=ScoreWeights(**dict(zip(SIGNALS, st.scorer.weights))), sigma=ScoreSigma(**dict(zip(SIGNALS, s))))
        for st, s in zip(res.stages, res.sigmas)
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
            divergence=sig_digits(res.divergence),
            versions=versions(),
            notes=(f"KL(quantized unpruned || quantized pruned) at the first answer position, mean over "
                   f"samples; naive schedule (one attention-only stage at layer 0) {sig_digits(res.naive_divergence)}; "
                   f"{res.evals} candidates evaluated"
                   + (f"; ablation: score weights restricted to {', '.join(x for x in SIGNALS if x in signals)}"
                      if restricted else "")
                   + ("; ablation: no merging of dropped tokens" if merge == "none" else "")
                   + ("" if plan.full else f"; {plan.describe()}")),
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
    meta = weight_meta(wq, cfg.a_bits, adapter, sorted(g.qweights), cfg.quant.activations.rotation, calibrated_on={
        "data": c.data, "samples": c.samples, "seed": c.seed,
        "schedule": [[s.layer, s.keep] for s in recipe.pruning.stages]})
    notes = (f"{c.notes}; weights: GPTQ layer by layer on the pruned, quantized streams of the calibration "
             f"samples, output error GPTQ/RTN {sig_digits(g.error_ratio(), 4)} per layer")
    res.weights = (g, meta)
    return recipe.model_copy(update={"calibration": c.model_copy(update={"notes": notes})})
