"""Benchmark harness: greedy answers per method, accuracy per task, retention, fidelity to FP.

    bench JSONL --load_bench(limit)--> samples --adapter.prompt--> prompts (real or blank images)
    method x scheme --Deployed.generate (batch 1, greedy)--> answer text + first-answer-token logits
    FP full-token run (cached per model + bench + samples) --> reference for retention/fidelity

Scoring: an answer is correct if the greedy text equals `answer` after strip/lower; for a
multiple-choice sample (`options` given) the letter is compared (a reply naming an option's text
counts as that option's letter).

    accuracy[task] = correct / samples of the task;   overall = correct / all samples
    retention      = mean over tasks with FP accuracy > 0 of accuracy[task] / FP accuracy[task]
    agreement      = fraction of samples whose answer text equals the FP full-token answer
    kl             = mean KL(P_fp || P_method) of the first answer token (nats)

Methods: fp (no quantization, no pruning), none (quantized, no pruning), quota (a recipe),
and the stage-wise baselines of prune/baselines.py (FP-scored, replayed in the quantized model).
Schemes (--quant) take RTN weights; `<scheme>-gptq` (e.g. w4a4kv4-gptq) takes GPTQ weights
calibrated on the full (unpruned) token streams of `calib` samples: the stage-wise quantizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quota_export import UserError

METHODS = ("fp", "none", "quota", "fastv", "pdrop", "sparsevlm", "divprune", "random")
MAX_NEW_TOKENS = 8
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_FP_CACHE: dict[tuple, "MethodRun"] = {}


# ---------------------------------------------------------------- scoring (pure)


def normalize(text: str) -> str:
    return text.strip().lower()


def choice_letter(pred: str, options: list[str]) -> str | None:
    """The option letter a reply names: its first word as a letter ('b', 'B.', 'b)'), or an
    option's text; None if neither."""
    p = normalize(pred)
    letters = [L.lower() for L in LETTERS[: len(options)]]
    first = p.split()[0].rstrip(".):") if p.split() else ""
    if first in letters:
        return first
    opts = [normalize(o) for o in options]
    return letters[opts.index(p)] if p in opts else None


def is_correct(pred: str, answer: str, options: list[str] | None = None) -> bool:
    if options:
        return choice_letter(pred, options) == normalize(answer)
    return normalize(pred) == normalize(answer)


def per_task_accuracy(tasks: list[str], correct: list[bool]) -> dict[str, float]:
    """Accuracy per task, tasks in order of first appearance."""
    out: dict[str, list[int]] = {}
    for t, c in zip(tasks, correct):
        out.setdefault(t, []).append(int(c))
    return {t: sum(v) / len(v) for t, v in out.items()}


def retention(per_task: dict[str, float], fp_per_task: dict[str, float]) -> float:
    """Mean over tasks (with FP accuracy > 0) of accuracy / FP accuracy; nan if there is none."""
    r = [per_task.get(t, 0.0) / a for t, a in fp_per_task.items() if a > 0]
    return sum(r) / len(r) if r else math.nan


def kl_rows(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) of each row of log-prob rows [S, V] -> [S]."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def mean_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over rows of KL(P_ref || P) for log-prob rows [S, V]."""
    return float(kl_rows(ref_logp, logp).mean())


# ---------------------------------------------------------------- runs


@dataclass
class MethodRun:
    answers: list[str]
    first_logp: torch.Tensor  # [S, V] float64 log-probs of the first answer token
    mean_kept: float  # mean kept fraction of visual tokens over all decoder layers


def blank_image(adapter, bench_path: Path) -> np.ndarray:
    """The no-image control: for the shapes benchmark `render(scene, blank=True)` (the grid on
    the background, no objects); for any other benchmark a constant black image of the model's size."""
    h, w = adapter.image_size()
    try:
        import calib_data.shapes as shapes

        if (h, w) == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE) and Path(shapes.__file__).parent.resolve() in (
            Path(bench_path).resolve().parents
        ):
            return shapes.render(shapes.make_scene(0), blank=True)  # blank: objects not drawn
    except ImportError:
        pass
    return np.zeros((h, w, 3), np.uint8)


def _mean_kept(stages, n: int, L: int) -> float:
    from quota_export.prune.schedule import total_kept

    return total_kept([s.layer for s in stages], [s.keep for s in stages], n, L) / (n * L)


class Harness:
    """One model + one benchmark slice; runs methods on it. Deployed models are cached per scheme."""

    def __init__(self, model: str | Path, bench: str | Path, samples: int | None = None,
                 progress: bool = False, max_new_tokens: int = MAX_NEW_TOKENS, calib: str | Path | None = None,
                 calib_samples: int = 64, calib_seed: int = 0):
        from quota_export import models
        from quota_export.data import load_bench

        self.model_path = Path(model)
        self.bench_path = Path(bench)
        self.samples = load_bench(bench, limit=samples)
        self.adapter = models.load(model)
        self.progress = progress
        self.max_new_tokens = max_new_tokens
        self.key = (str(self.model_path.resolve()), str(self.bench_path.resolve()), samples, max_new_tokens)
        self._deps: dict[str, object] = {}
        self._prompts: dict[bool, list] = {}
        self.tokenizer = self.adapter.processor.tokenizer
        self.calib = (calib, calib_samples, calib_seed)  # for `<scheme>-gptq`

    # -- pieces
    def prompts(self, blank: bool = False):
        if blank not in self._prompts:
            from quota_export.data import load_image

            img = blank_image(self.adapter, self.bench_path) if blank else None
            self._prompts[blank] = [
                self.adapter.prompt(img if blank else load_image(s), s.question) for s in self.samples
            ]
        return self._prompts[blank]

    def deployed(self, scheme: str):
        """Deployed model of a scheme (RTN weights; `<scheme>-gptq`: GPTQ on full token streams),
        no pruning stages."""
        from quota_export.recipe import SCHEMES, Pruning, Quant, Recipe
        from quota_export.reference import DeployConfig, Deployed

        base = scheme.removesuffix("-gptq")
        if base not in SCHEMES:
            raise UserError(f"--quant: unknown scheme {scheme!r} (known: {', '.join(SCHEMES)}, each also as <name>-gptq)")
        if scheme not in self._deps:
            r = Recipe(name="eval", model=str(self.model_path), quant=Quant(scheme=base),
                       pruning=Pruning(budget=1.0, n_visual=self.adapter.n_visual(), stages=[]))
            r.check_against(self.adapter.decoder_spec().num_layers, self.adapter.n_visual(), self.adapter.module_names())
            cfg = DeployConfig.from_recipe(r)
            self._deps[scheme] = Deployed(self.adapter, cfg, self._gptq_full(scheme, r, cfg) if base != scheme else None)
        return self._deps[scheme]

    def _gptq_full(self, scheme: str, r, cfg):
        """GPTQ weights calibrated on the full (unpruned) token streams of the calibration data."""
        from quota_export.calibrate import select_samples
        from quota_export.data import load_image
        from quota_export.gptq_calibrate import gptq_weights

        data, n, seed = self.calib
        if data is None:
            raise UserError(f"--quant {scheme}: GPTQ needs calibration data; give --calib JSONL")
        if cfg.weights.bits >= 16:
            raise UserError(f"--quant {scheme}: the scheme leaves the weights unquantized")
        wq = r.resolved_quant().weights.model_copy(update={"algorithm": "gptq"})
        prompts = [self.adapter.prompt(load_image(s), s.question) for s in select_samples(data, n, seed)]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as calibrate: the same weights on any machine
        try:
            return gptq_weights(self.adapter, cfg, wq, prompts, progress=self.progress).qweights
        finally:
            torch.set_num_threads(threads)

    def _recipe_deployed(self, recipe):
        from quota_export.build import deployed_at

        spec = self.adapter.decoder_spec()
        recipe.check_against(spec.num_layers, self.adapter.n_visual(), self.adapter.module_names())
        return deployed_at(recipe, self.adapter)[1]  # with the calibrated weights file, if any

    def _generate(self, dep, prompts, keep_fn_for=None, desc="eval") -> MethodRun:
        from tqdm import tqdm

        answers, logps = [], []
        for i, p in enumerate(tqdm(prompts, desc=desc, disable=not self.progress, unit="sample")):
            kf = keep_fn_for(i, p) if keep_fn_for is not None else None
            toks, out = dep.generate(p, self.max_new_tokens, keep_fn=kf)
            answers.append(self.tokenizer.decode(toks, skip_special_tokens=True).strip())
            logps.append(torch.log_softmax(out.logits.double().flatten(), dim=-1))
        spec = dep.spec
        return MethodRun(answers, torch.stack(logps), _mean_kept(dep.cfg.stages, self.adapter.n_visual(), spec.num_layers))

    # -- runs
    def fp_reference(self) -> MethodRun:
        """FP, full tokens, real images; cached in memory per model + bench + samples."""
        if self.key not in _FP_CACHE:
            _FP_CACHE[self.key] = self._generate(self.deployed("fp"), self.prompts(False), desc="eval fp reference")
        return _FP_CACHE[self.key]

    def run(self, method: str, quant: str | None = None, budget: float | None = None, recipe=None,
            blank: bool = False, merge: bool = False) -> MethodRun:
        """`merge` (stage-wise baselines only): dropped tokens are merged into their most similar
        kept token, in the FP selection pass and in the quantized model (a recipe says it with
        `pruning.merge`)."""
        from quota_export.prune import baselines

        if method not in METHODS:
            raise UserError(f"--method: unknown method {method!r} (known: {', '.join(METHODS)})")
        prompts = self.prompts(blank)
        if merge and method not in baselines.METHODS:
            raise UserError(f"--merge applies to the stage-wise baselines, not {method} "
                            "(a recipe sets it with pruning.merge)")
        if method == "quota":
            if recipe is None:
                raise UserError("--method quota needs --recipe")
            return self._generate(self._recipe_deployed(recipe), prompts, desc="eval quota")
        if recipe is not None:
            raise UserError(f"--recipe is only used with --method quota, not {method}")
        if method == "fp":
            if quant not in (None, "fp"):
                raise UserError(f"--method fp is the unquantized model; drop --quant {quant}")
            if not blank:
                return self.fp_reference()
            return self._generate(self.deployed("fp"), prompts, desc="eval fp")
        if quant is None:
            raise UserError(f"--method {method} needs --quant (a scheme name)")
        dep = self.deployed(quant)
        if method == "none":
            return self._generate(dep, prompts, desc=f"eval {quant}")
        if budget is None or not 0 < budget <= 1:
            raise UserError(f"--method {method} needs --budget in (0, 1]")
        spec = self.adapter.decoder_spec()
        n = self.adapter.n_visual()
        try:
            sched = baselines.schedule(method, n, spec.num_layers, budget)
        except ValueError as e:
            raise UserError(f"--budget: {e}") from None
        qdep = baselines.restaged(dep, sched, merge)
        fp = self.deployed("fp")

        def keep_fn_for(i, p):
            emb = fp.embed_prompt(p)
            pos = p.positions()
            return baselines.stagewise_keep_fn(method, fp, sched, emb, pos, p.visual_start, p.n_visual, seed=i,
                                               merge=merge)

        return self._generate(qdep, prompts, keep_fn_for if sched else None,
                              desc=f"eval {method}{' + merge' if merge else ''} {quant}")

    # -- metrics
    def score(self, res: MethodRun) -> dict:
        tasks = [s.task for s in self.samples]
        correct = [is_correct(a, s.answer, s.options) for a, s in zip(res.answers, self.samples)]
        ref = self.fp_reference()
        fp_correct = [is_correct(a, s.answer, s.options) for a, s in zip(ref.answers, self.samples)]
        per_task = per_task_accuracy(tasks, correct)
        fp_task = per_task_accuracy(tasks, fp_correct)
        return {
            "overall": sum(correct) / len(correct),
            "per_task": per_task,
            "retention": retention(per_task, fp_task),
            "agreement": sum(a == b for a, b in zip(res.answers, ref.answers)) / len(res.answers),
            "kl": mean_kl(ref.first_logp, res.first_logp),
            "fp_per_task": fp_task,
            "mean_kept": res.mean_kept,
            "samples": len(correct),
        }

    def evaluate(self, method: str, quant: str | None = None, budget: float | None = None, recipe=None,
                 blank: bool = False, merge: bool = False) -> dict:
        return self.score(self.run(method, quant, budget, recipe, blank, merge))


JSON_KEYS = ("overall", "per_task", "retention", "agreement", "kl")


def json_report(metrics: dict) -> dict:
    """The --json content: {"overall","per_task","retention","agreement","kl"} (nan -> null)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return {k: clean(metrics[k]) for k in JSON_KEYS}
