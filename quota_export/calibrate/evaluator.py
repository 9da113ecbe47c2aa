"""The fast evaluator of calibration candidates, and the calibration samples.

The unpruned quantized stream of every calibration sample is computed once (the input of every
layer, and the reference log-probabilities); a candidate runs from its first stage layer on it,
and within a batch of candidates the states and signals of a common stage prefix are computed
once. The result equals `Deployed.prefill` with the same stages bit for bit
(tests/calibrate/test_calibrate.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from quota_export.calibrate.space import Candidate
from quota_export.recipe import SIGNALS

SIG_DIGITS = 6


def sig_digits(x: float, digits: int = SIG_DIGITS) -> float:
    return float(f"{x:.{digits}g}")


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
        sigma.append(1.0 if c else sig_digits(sd))
        const.append(c)
    return tuple(sigma), tuple(const)


class Evaluator:
    """Caches the unpruned quantized stream of the calibration samples; measures candidates.

    A candidate is a tuple of `CandStage`s (space.py). Stage j's sigma is the std
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
                h = dep.stream(p)
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
            parent = self._entry(prefix[:-1], prefix[-1].layer, memo)
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
        layer, keep, scorer = stage.layer, stage.keep, stage.scorer
        start = smp.start
        if scorer.select == "maxmin":
            idx = stable_topk(maxmin_score(self.dep.cosine(layer, h, pos, start, n), keep), keep)
        else:
            idx = stable_topk(stage_score(scorer.weights, sigma, *signals), keep)
        if self.dep.cfg.merge:
            cnt = self.dep.merge_counts(layer, h, pos, idx, start, n, torch.ones(n, dtype=torch.float64) if cnt is None else cnt)
        bias = self.dep.key_bias(cnt, start)
        h, pos, pre = self.dep.prune_stage(layer, h, pos, idx, start, n)
        for l in range(layer, to_layer):
            h, _ = self.dep.layer(l, h, pos, pre if l == layer else None, bias)
        return h, pos, keep, cnt

    def stage_sigmas(self, cand: Candidate) -> list[tuple[float, ...]]:
        """The sigma of each stage of a candidate (measured on the stream that stage sees)."""
        out = []
        for j, st in enumerate(cand):
            key = (cand[:j], st.layer)
            if key not in self.sigma_cache:
                self._entry(cand[:j], st.layer, {})
            out.append(self.sigma_cache[key][0])
        return out

    def constant(self, prefix: tuple, layer: int) -> tuple[bool, ...]:
        key = (prefix, layer)
        if key not in self.sigma_cache:
            self._entry(prefix, layer, {})
        return self.sigma_cache[key][1]

    @torch.no_grad()
    def divergence(self, cands: list[Candidate], bar=None) -> list[float]:
        """Mean KL for each candidate; cached across calls."""
        todo = [c for c in dict.fromkeys(cands) if c not in self.cache]
        for i in range(0, len(todo), self.CHUNK):
            memo: dict = {}
            for c in todo[i : i + self.CHUNK]:
                if not c:
                    self.cache[c] = 0.0
                else:
                    e = self._entry(c[:-1], c[-1].layer, memo)
                    tot = 0.0
                    for smp, st, sg in zip(self.samples, e.states, e.signals):
                        h = self._advance(smp, st, sg, e.sigma, c[-1], self.L)[0]
                        tot += kl(smp.ref_logp, self.dep.head(h))
                    self.cache[c] = tot / len(self.samples)
                self.evals += 1
                if bar is not None:
                    bar.update()
        return [self.cache[c] for c in cands]
