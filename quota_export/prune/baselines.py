"""Stage-wise baselines: pruning scored on the FULL-PRECISION model, replayed in the quantized one.

    prompt --FP Deployed (same schedule, baseline selector on its OWN pruned stream)--> kept idx per stage
           --quantized Deployed.prefill/generate(keep_fn = replay of those indices)--> answer

That is the stage-wise pipeline docs/design.md §4 compares against: the pruning decisions come from a
model the deployment never runs. The FP scorer sees the FP model's own stream (its hidden states
after its own earlier stages), not the quantized model's hidden states; the quantized model then
drops exactly the tokens the FP model dropped. The quantizer is the scheme's RTN (which needs no
calibration, so "calibrated on full token streams" holds trivially).

Methods (all at the same budget: mean over all decoder layers of kept visual tokens <= budget*N,
with the largest keeps that meet it):

    fastv     one stage at layer K=2 (or the deepest layer <= 2 that can meet the budget);
              score = attention of the last prompt token, mean over heads (Chen et al. 2024)
    pdrop     stages at layers L*j//4, j=1..3 (shifted down if the first cannot meet the
              budget), keep k_j = k_1 * lam^j with lam = 0.5; score = attention of the last
              instruction token, mean over heads (Xing et al. 2024)
    sparsevlm stages at layers round(L*x), x in (2, 6, 15)/32 (SparseVLM's 2/6/15 of 32),
              keep ratio 0.5 per stage; score = attention from "raters": the instruction tokens
              whose attention mass on the visual span is >= the mean over instruction tokens
              (Zhang et al. 2024; no token recycling)
    divprune  layer 0, max-min diversity of the visual features at the decoder input (Alvar et al. 2025)
    random    layer 0, uniform random k (seeded per sample)

Deviations, stated: attention scores are computed at the pruning layer from that layer's own
q/k on its input (as the deployed QUOTA pruner does), not from the previous layer's attention
map; "instruction tokens" are the text tokens after the visual span (question + assistant
prefix), and the last of them is the last prompt token.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch

from quota_export.ops.gather import stable_topk
from quota_export.prune.schedule import geometric_keeps
from quota_export.prune.selectors import divprune, random_keep

METHODS = ("fastv", "pdrop", "sparsevlm", "divprune", "random")
PDROP_LAMBDA = 0.5
SPARSEVLM_RATIO = 0.5
FASTV_K = 2


# ---------------------------------------------------------------- schedules


def fit_keeps(layers: list[int], ratio: float, n: int, L: int, budget: float) -> list[int] | None:
    """keeps k_j = max(1, floor(k_1 ratio^j)), k_1 the largest meeting the budget (None if none)."""
    return geometric_keeps(layers, ratio, n, L, budget)


def _dedupe(layers, keeps):
    """Drop stages that keep as many as the previous one (no-ops), and stages past the last layer."""
    out_l, out_k = [], []
    for l, k in zip(layers, keeps):
        if out_k and k >= out_k[-1]:
            continue
        out_l.append(l)
        out_k.append(k)
    return out_l, out_k


def _shifted(layers: list[int], ratio: float, n: int, L: int, budget: float):
    """`layers` (ascending) shifted down by the least amount that makes them meet the budget."""
    for shift in range(0, layers[0] + 1):
        ls = sorted({max(0, l - shift) for l in layers})
        ks = fit_keeps(ls, ratio, n, L, budget)
        if ks is not None:
            return _dedupe(ls, ks)
    raise ValueError(f"budget {budget}: no schedule over {L} layers meets it")


def schedule(method: str, n: int, L: int, budget: float) -> list[tuple[int, int]]:
    """[(layer, keep)] of a baseline at `budget` (mean kept fraction over all L decoder layers)."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r} (known: {', '.join(METHODS)})")
    if math.floor(budget * n * L + 1e-9) >= n * L:
        return []
    if method == "fastv":
        layers, ks = _shifted([min(FASTV_K, L - 1)], 1.0, n, L, budget)
    elif method == "pdrop":
        layers = sorted({max(1, L * j // 4) for j in (1, 2, 3)} & set(range(L))) or [0]
        layers, ks = _shifted(layers, PDROP_LAMBDA, n, L, budget)
    elif method == "sparsevlm":
        layers = sorted({min(L - 1, round(L * x / 32)) for x in (2, 6, 15)})
        layers, ks = _shifted(layers, SPARSEVLM_RATIO, n, L, budget)
    else:  # divprune, random: once, at the decoder input
        layers, ks = [0], fit_keeps([0], 1.0, n, L, budget)
    return list(zip(layers, ks))


# ---------------------------------------------------------------- scorers (on the given model's own stream)


def _instruction_attention(dep, layer, h, pos, start, n):
    """Attention probs of the instruction queries (text after the span): [1, H, Tq, T]."""
    a = dep.qkv(layer, h, pos)
    p, _ = dep.attend(a.q[:, :, start + n :], a.k_cache, a.v_cache, causal_offset=start + n)
    return p


def last_token_attention(dep, layer, h, pos, start, n) -> torch.Tensor:
    """[1, n]: attention of the last prompt token to each visual token, mean over heads."""
    p = _instruction_attention(dep, layer, h, pos, start, n)
    return p[:, :, -1, start : start + n].mean(dim=1)


def rater_attention(dep, layer, h, pos, start, n) -> torch.Tensor:
    """[1, n]: SparseVLM-style text raters. Relevance of instruction token t = its attention mass
    on the visual span (mean over heads); raters = tokens with relevance >= the mean; score =
    mean over heads and raters of the attention to each visual token."""
    p = _instruction_attention(dep, layer, h, pos, start, n).mean(dim=1)[0]  # [Tq, T]
    vis = p[:, start : start + n]  # [Tq, n]
    rel = vis.sum(dim=-1)
    raters = rel >= rel.mean()
    return vis[raters].mean(dim=0, keepdim=True)


@dataclass
class Selector:
    """Chooses kept indices ([1, k] ascending) for stage j of a baseline on `dep`'s own stream."""

    method: str
    seed: int = 0

    def __call__(self, dep, j, layer, h, pos, start, n, k) -> torch.Tensor:
        if self.method in ("fastv", "pdrop"):
            return stable_topk(last_token_attention(dep, layer, h, pos, start, n), k)
        if self.method == "sparsevlm":
            return stable_topk(rater_attention(dep, layer, h, pos, start, n), k)
        if self.method == "divprune":
            return divprune(h[:, start : start + n].float(), k)
        if self.method == "random":
            return random_keep(n, k, self.seed * 1000003 + j)
        raise ValueError(f"unknown baseline {self.method!r}")


# ---------------------------------------------------------------- FP selection -> quantized replay


def stage_cfgs(sched: list[tuple[int, int]]):
    from quota_export.reference import StageCfg

    return [StageCfg(l, k, (0.0, 1.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0)) for l, k in sched]


def restaged(dep, sched: list[tuple[int, int]], merge: bool | None = None):
    """A view of `dep` (same weights, shared) whose prefill prunes at `sched` [(layer, keep)];
    `merge`: dropped tokens are merged into their most similar kept token, as a recipe's
    `pruning.merge: proportional` (`Deployed.merge_counts`); None keeps `dep`'s setting."""
    d = copy.copy(dep)
    d.cfg = replace(dep.cfg, stages=stage_cfgs(sched), merge=dep.cfg.merge if merge is None else merge)
    d.stage_at = {s.layer: s for s in d.cfg.stages}
    return d


def fp_selection(fp_dep, method: str, sched, embeds, pos, start: int, n: int, seed: int = 0,
                 merge: bool = False) -> list[torch.Tensor]:
    """Run the FP model's prefill with the baseline's schedule and selector (with `merge`, the FP
    stream merges the dropped tokens too, so later stages score what the FP model then sees);
    returns the indices chosen at each stage, relative to the tokens present at that stage ([1, k]
    ascending)."""
    d = restaged(fp_dep, sched, merge)
    sel = Selector(method, seed)
    chosen: list[torch.Tensor] = []

    def keep_fn(stage, layer, h, p, s, cur_n):
        idx = sel(d, len(chosen), layer, h, p, s, cur_n, stage.keep)
        chosen.append(idx)
        return idx

    d.prefill(embeds, pos, start, n, keep_fn=keep_fn)
    return chosen


def replay(chosen: list[torch.Tensor]):
    """keep_fn for `Deployed.prefill/generate` that returns the recorded indices stage by stage."""
    it = iter(chosen)

    def keep_fn(stage, layer, h, pos, start, n):
        idx = next(it)
        if idx.shape[1] != stage.keep or (idx.numel() and int(idx.max()) >= n):
            raise RuntimeError(f"replayed indices do not fit stage at layer {layer} (keep {stage.keep}, n {n})")
        return idx

    return keep_fn


def stagewise_keep_fn(method: str, fp_dep, sched, embeds, pos, start: int, n: int, seed: int = 0,
                      merge: bool = False):
    """The keep_fn a quantized `restaged(dep, sched, merge)` uses for one prompt: FP selection, replayed."""
    return replay(fp_selection(fp_dep, method, sched, embeds, pos, start, n, seed, merge))
