"""The evaluator of calibration candidates, and the calibration samples.

One reference pass runs every calibration sample through the quantized, unpruned model as
deployed (`Deployed`, one sample at a time) and keeps, per sample, the reference log-probabilities
and the input of the layers a stage may sit at (the search's layer grid) in files on disk, one per
layer: memory stays flat in depth (one sample's stream in RAM during the pass, one layer's states
of the samples in use during the search). A candidate then runs from its first stage layer on
those states; within a batch of candidates the states and signals of a common stage prefix are
computed once.

Two views measure a candidate (`View`):

- `exact`: the objective itself: every sample, the deployed reductions, samples of one prompt
  shape batched ([B, T, D] per op, calibrate/batched.py: row b is sample b's result bit for bit,
  so a batch shares each layer's weights without changing a value). It equals `Deployed.prefill`
  with the same stages bit for bit (tests/calibrate/test_calibrate.py);
- `screen`: a proxy for ranking many candidates: the samples the naive schedule disturbs most
  (`Evaluator.focus`), batched the same way, the last layer on the answer position only.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quota_export.calibrate import batched
from quota_export.calibrate.space import Candidate
from quota_export.ops.signals import signals_from
from quota_export.recipe import SIGNALS

SIG_DIGITS = 6
MAX_BATCH_TOKENS = 8192  # batches hold at most this many prompt tokens (bounds memory)
# ... and at most this many attention scores (heads x T x T a sample): the fp64 scores of a batch
# are ~4 such tensors at once (scores, mask, softmax); 2^26 -> 5 samples of the TinyLLaVA geometry
MAX_BATCH_SCORES = 1 << 26


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


@dataclass
class _Sample:
    T: int
    start: int
    n: int
    pos: torch.Tensor  # [1, T] or planes [P, 1, T]
    ref_logp: torch.Tensor  # [V] float64 log-probs of the quantized unpruned model
    offset: int  # first row of this sample in the layer files


@dataclass
class _Batch:
    """Samples of one prompt shape measured together (their indices ascending)."""

    idx: list[int]
    start: int
    n: int
    pos: torch.Tensor  # [B, T] or [P, B, T]


@dataclass
class _State:
    h: torch.Tensor  # [B, T', D]
    pos: torch.Tensor
    n: int
    cnt: torch.Tensor | None  # [B, n] merged-token counts (float64), None before any merging stage


@dataclass
class _Entry:
    """Every batch's state at the input of a stage's layer (earlier stages applied), with the
    signals the stage scores there, its code cosine, and their calibration statistics."""

    states: list[_State]
    signals: list[tuple]  # per batch (mag, att, risk, div), each [B, n]
    cos: list[torch.Tensor]  # per batch [B, n, n]
    qkv: list  # per batch the layer's QKV (the kept rows are taken from it), or None: recomputed
    sigma: tuple[float, ...]  # per signal: std over the view's tokens, SIG_DIGITS digits (1 if constant)
    constant: tuple[bool, ...]  # which signals are constant (their weight is irrelevant)


class View:
    """Candidates measured with one model view (`dep`) on some of the samples, in batches.

    Stage j's sigma is the std of each signal over the view's calibration tokens present at its
    layer in the stream it really sees (stages before it applied), so it depends on the
    candidate's prefix: `stage_sigmas`."""

    CHUNK = 16  # candidates per batch sharing one prefix memo (bounds memory)

    def __init__(self, ev: Evaluator, dep, batches: list[_Batch], name: str, last_only: bool = False,
                 keep_qkv: bool = True, sigmas: dict | None = None):
        self.ev, self.dep, self.batches, self.name = ev, dep, batches, name
        self.sigmas = sigmas  # (prefix, layer) -> (sigma, constant) measured by another view (on more samples)
        self.last_only = last_only  # the last layer on the last position only (a proxy's shortcut)
        self.keep_qkv = keep_qkv  # keep a stage layer's QKV between scoring and pruning (memory: ~10 x h)
        self.samples = sorted(i for b in batches for i in b.idx)
        self.cache: dict[tuple, float] = {}
        self.sigma_cache: dict[tuple, tuple] = {}  # (prefix, layer) -> (sigma, constant)
        self.evals = 0

    @torch.no_grad()
    def _entry(self, prefix: tuple, layer: int, memo: dict) -> _Entry:
        key = (prefix, layer)
        if key in memo:
            return memo[key]
        dep = self.dep
        if not prefix:
            states = [_State(self.ev.states(layer, b.idx), b.pos, b.n, None) for b in self.batches]
        else:
            parent = self._entry(prefix[:-1], prefix[-1].layer, memo)
            states = [self._advance(b, st, sg, cs, a, parent.sigma, prefix[-1], layer)
                      for b, st, sg, cs, a in zip(self.batches, parent.states, parent.signals, parent.cos, parent.qkv)]
        sigs, coss, qkvs = [], [], []
        for b, st in zip(self.batches, states):
            a = dep.signal_qkv(layer, st.h, st.pos)  # the signals' view (rotation: the checkpoint's basis)
            cs = batched.code_cosine(dep, a, b.start, st.n)
            bias = batched.key_bias(st.cnt, b.start, dep.hp)
            sigs.append(signals_from(a, st.h, b.start, st.n, dep.heads, dep.hp, dep.cfg.kv_bits < 16, bias))
            coss.append(cs)
            qkvs.append(a if self.keep_qkv else None)
        # statistics over the tokens in sample order (the order the reduction sees them in)
        rows = {i: (j, r) for j, b in enumerate(self.batches) for r, i in enumerate(b.idx)}
        if self.sigmas is not None and key in self.sigmas:
            sigma, const = self.sigmas[key]
        else:
            per_sample = [tuple(x[r] for x in sigs[j]) for j, r in (rows[i] for i in self.samples)]
            sigma, const = _stats(per_sample)
        self.sigma_cache[key] = (sigma, const)
        memo[key] = e = _Entry(states, sigs, coss, qkvs, sigma, const)
        return e

    def _advance(self, b: _Batch, st: _State, signals, cs, a, sigma, stage, to_layer: int) -> _State:
        """Prune `st` at `stage` (scored from `signals`; `cs`, `a` its layer's code cosine and QKV),
        then run its layer .. to_layer - 1."""
        from quota_export.ops.gather import stable_topk
        from quota_export.ops.signals import stage_score

        dep = self.dep
        layer, keep, scorer = stage.layer, stage.keep, stage.scorer
        if scorer.select == "maxmin":
            idx = stable_topk(batched.maxmin_scores(cs, keep), keep)
        else:
            idx = stable_topk(stage_score(scorer.weights, sigma, *signals), keep)
        cnt = st.cnt
        if dep.cfg.merge:
            ones = torch.ones(idx.shape[0], st.n, dtype=torch.float64)
            cnt = batched.counts(cs, idx, ones if cnt is None else cnt)
        bias = batched.key_bias(cnt, b.start, dep.hp)
        if a is None:
            a = dep.qkv(layer, st.h, st.pos)
        h, pos, rows = batched.gather_rows(st.h, st.pos, idx, b.start, st.n)
        pre = batched.qkv_rows(a, rows)
        for l in range(layer, to_layer):
            last = self.last_only and l == self.ev.L - 1
            h = batched.layer(dep, l, h, pos, pre if l == layer else None, bias, last_only=last)
        return _State(h, pos, keep, cnt)

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
        """Mean KL over the view's samples for each candidate; cached across calls. With
        `Evaluator.workers` > 1 the chunks of candidates go to worker processes: a candidate's
        value does not depend on which process or chunk measured it."""
        todo = [c for c in dict.fromkeys(cands) if c not in self.cache]
        w = self.ev.workers
        size = max(1, min(self.CHUNK, -(-len(todo) // w)))
        chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
        if w > 1 and len(chunks) > 1:
            results = self.ev.pool().imap(_measure, [(self.name, ch) for ch in chunks])
        else:
            results = (self.measure(ch) for ch in chunks)
        for ch, res in zip(chunks, results):
            for c, d in zip(ch, res):
                self.cache[c] = d
                self.evals += 1
                if bar is not None:
                    bar.update()
        return [self.cache[c] for c in cands]

    @torch.no_grad()
    def measure(self, chunk: list[Candidate]) -> list[float]:
        """Mean KL of each candidate of `chunk` (their common stage prefixes computed once; a
        prefix's states are dropped once no later candidate of the chunk needs them, so memory
        holds the prefixes in use rather than all of the chunk's)."""
        memo: dict = {}
        out = []
        need = [{(c[:j], c[j].layer) for j in range(len(c))} for c in chunk]
        for i, c in enumerate(chunk):
            live = set().union(*need[i:])
            for key in [k for k in memo if k not in live]:
                del memo[key]
            tot = 0.0
            for x in self.per_sample(c, memo):
                tot += x
            out.append(tot / len(self.samples))
        return out

    @torch.no_grad()
    def per_sample(self, c: Candidate, memo: dict | None = None) -> list[float]:
        """The KL of each of the view's samples (in sample order) under candidate `c`."""
        if not c:
            return [0.0] * len(self.samples)
        e = self._entry(c[:-1], c[-1].layer, {} if memo is None else memo)
        kls = {}
        for b, st, sg, cs, a in zip(self.batches, e.states, e.signals, e.cos, e.qkv):
            h = self._advance(b, st, sg, cs, a, e.sigma, c[-1], self.ev.L).h
            for r, s in enumerate(b.idx):  # the head one row at a time, as Deployed
                kls[s] = kl(self.ev.samples[s].ref_logp, self.dep.head(h[r : r + 1]))
        return [kls[s] for s in self.samples]


_WORKER_EV: Evaluator | None = None  # the evaluator a forked worker inherited
_REFERENCE: tuple | None = None  # (dep, prompts, layers) of the reference pass being run


@torch.no_grad()
def _reference_pass(i: int):
    """Sample i through the unpruned model as deployed -> (the input of each of `layers` [T, D]
    fp32 numpy, the reference log-probabilities [V] fp64)."""
    dep, prompts, layers = _REFERENCE
    p = prompts[i]
    h = dep.stream(p)
    pos = p.positions()
    states = []
    for l in range(dep.spec.num_layers):
        if l in layers:
            states.append(h[0].contiguous().numpy().copy())
        h, _ = dep.layer(l, h, pos)
    return states, torch.log_softmax(dep.head(h).double().flatten(), dim=-1)


_ONE_STAGE: tuple | None = None  # (evaluator, candidate) of the single-stage measurement being run


@torch.no_grad()
def _one_stage_kl(i: int) -> float:
    """Sample i's KL under a single-stage candidate, its stage's sigmas those of all samples."""
    ev, cand = _ONE_STAGE
    view = View(ev, ev.dep, [ev._batch([i])], "one", keep_qkv=False, sigmas=ev.exact.sigma_cache)
    return view.per_sample(cand)[0]


def _init_worker():
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a worker ends quietly when the pool does
    torch.set_num_threads(1)


def _warm_tail():
    """A candidate worker makes the last layers' fp32 weights first: the weight cache keeps what
    comes first while it fits (weightcache.PinnedCache), and every candidate runs the last layers
    while only some start early, so on a model whose weights do not all fit, the cache holds the
    tail rather than the head. Only what is cached changes, never a value."""
    _init_worker()
    dep = _WORKER_EV.dep
    cache = dep._cache
    for l in reversed(range(dep.spec.num_layers)):
        for lin in dep.W[l]:
            used = cache.used
            w = dep.W[l][lin]
            if cache.used == used and used + w.numel() * w.element_size() > cache.budget:
                return


def _measure(job):
    name, chunk = job
    return getattr(_WORKER_EV, name).measure(chunk)


class Evaluator:
    """The calibration samples' reference pass (disk-backed states at `layers`) and two views:
    `exact` (the objective) and `screen` (the proxy, `focus`; until then the exact view).

    `layers`: the layers a stage may sit at (default: every layer). `workers` > 1: candidates are
    measured in that many forked processes (created at the first batch of candidates that needs
    them; views created after that are not known to them)."""

    def __init__(self, dep, prompts, progress: bool = False, layers=None, workdir: str | Path | None = None,
                 workers: int = 1):
        from tqdm import tqdm

        self.dep = dep
        self.workers = max(1, int(workers))
        self._pool = None
        self.L = dep.spec.num_layers
        self.layers = sorted(set(range(self.L) if layers is None else layers))
        self._tmp = tempfile.TemporaryDirectory(prefix="quota-calib-", dir=workdir)
        self.dir = Path(self._tmp.name)
        self.samples: list[_Sample] = []
        self.D = 0
        files = {l: open(self.dir / f"layer{l}.f32", "wb") for l in self.layers}
        offset = 0
        global _REFERENCE
        _REFERENCE = (dep, prompts, self.layers)
        pool = None
        try:
            if self.workers > 1 and len(prompts) > 1:  # one sample a work unit, results in sample order
                import multiprocessing

                pool = multiprocessing.get_context("fork").Pool(self.workers, initializer=_init_worker)
                passes = pool.imap(_reference_pass, range(len(prompts)))
            else:
                passes = map(_reference_pass, range(len(prompts)))
            for p, (states, ref) in tqdm(zip(prompts, passes), desc="calibrate: reference", total=len(prompts),
                                         disable=not progress, unit="sample"):
                for l, x in zip(self.layers, states):
                    files[l].write(x.tobytes())
                T, self.D = states[0].shape if states else (p.input_ids.shape[1], 0)
                self.samples.append(_Sample(T, p.visual_start, p.n_visual, p.positions(), ref, offset))
                offset += T
        finally:
            _REFERENCE = None
            if pool is not None:
                pool.terminate()
                pool.join()
            for f in files.values():
                f.close()
        self.n_visual = self.samples[0].n if self.samples else 0
        self.exact = View(self, dep, self._batches(range(len(self.samples))), "exact", keep_qkv=False)
        self.screen = self.exact

    def focus(self, cand: Candidate, m: int, progress: bool = False, fp64: bool = True) -> list[int]:
        """Make the screen the m samples with the largest KL under `cand` (measured exactly; ties:
        the lower index), measured together in batches of equal prompt shape, the last layer on
        the answer position only. The objective is a mean over samples whose KL is concentrated
        in a few of them (on the shipped model the 10 largest of 128 carry 83 % of the naive
        schedule's), so these samples rank candidates nearly as all of them do (docs/calibration.md).
        `fp64=False`: the screen's reductions in fp32 (a cheaper proxy: ~20 % less per layer on
        the TinyLLaVA geometry, attention being a third of a layer in fp64).
        Returns the chosen indices (ascending)."""
        if self._pool is not None:
            raise RuntimeError("focus: the worker processes are already running")
        kls = self.per_sample(cand, progress)
        self.exact.cache.setdefault(cand, sum(kls) / len(kls) if kls else 0.0)
        top = sorted(sorted(range(len(kls)), key=lambda i: (-kls[i], i))[:m])
        dep = self.dep.with_reductions(fp64 and self.dep.cfg.fp64)
        self.screen = View(self, dep, self._batches(top), "screen", last_only=True)
        return top

    def per_sample(self, cand: Candidate, progress: bool = False) -> list[float]:
        """The exact KL of each sample under `cand`. A single-stage candidate's samples are
        independent once its stage's sigmas (over all samples' tokens at its layer, the unpruned
        states) are known: with workers they are measured one sample a work unit, in parallel, each
        exactly as the exact view measures it (the same values, in sample order)."""
        from tqdm import tqdm

        if len(cand) != 1 or self.workers < 2 or len(self.samples) < 2:
            return self.exact.per_sample(cand)
        self.exact.constant((), cand[0].layer)  # the stage's sigmas, before the workers fork
        global _ONE_STAGE
        _ONE_STAGE = (self, cand)
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(self.workers, initializer=_init_worker)
        try:
            return list(tqdm(pool.imap(_one_stage_kl, range(len(self.samples))), total=len(self.samples),
                             desc="calibrate: screen choice", unit="sample", disable=not progress))
        finally:
            _ONE_STAGE = None
            pool.terminate()
            pool.join()

    def pool(self):
        """The worker processes (forked on first use: they share the model and the states' files)."""
        global _WORKER_EV
        if self._pool is None:
            import multiprocessing

            _WORKER_EV = self
            self._pool = multiprocessing.get_context("fork").Pool(self.workers, initializer=_warm_tail)
        return self._pool

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _batch(self, idx: list[int]) -> _Batch:
        s = self.samples[idx[0]]
        pos = s.pos
        B = len(idx)
        return _Batch(idx, s.start, s.n, pos.expand(B, -1) if pos.dim() == 2 else pos.expand(-1, B, -1))

    def _batches(self, idx: list[int]) -> list[_Batch]:
        """Samples of equal prompt shape (length, visual span, positions) together, at most
        MAX_BATCH_TOKENS tokens and MAX_BATCH_SCORES attention scores a batch; in order of each
        shape's first sample. (A batch's rows are its samples' own results bit for bit, so the
        batching bounds memory without changing a value.)"""
        groups: dict[tuple, list[int]] = {}
        for i in idx:
            s = self.samples[i]
            groups.setdefault((s.T, s.start, s.n, s.pos.numpy().tobytes()), []).append(i)
        out = []
        for g in groups.values():
            T = self.samples[g[0]].T
            per = max(1, min(MAX_BATCH_TOKENS // T, MAX_BATCH_SCORES // (self.dep.heads.heads * T * T)))
            out += [self._batch(g[j : j + per]) for j in range(0, len(g), per)]
        return out

    def states(self, layer: int, idx: list[int]) -> torch.Tensor:
        """The unpruned input of `layer` of the samples `idx` (one prompt shape): [B, T, D] fp32."""
        rows = []
        with open(self.dir / f"layer{layer}.f32", "rb") as f:
            for i in idx:
                s = self.samples[i]
                f.seek(s.offset * self.D * 4)
                rows.append(np.frombuffer(f.read(s.T * self.D * 4), dtype=np.float32).reshape(s.T, self.D))
        return torch.from_numpy(np.stack(rows))

    # the exact view's interface, for callers that measure the objective itself
    def divergence(self, cands, bar=None):
        return self.exact.divergence(cands, bar)

    def stage_sigmas(self, cand):
        return self.exact.stage_sigmas(cand)

    def constant(self, prefix, layer):
        return self.exact.constant(prefix, layer)
