"""Quality retention of QUOTA vs the stage-wise baselines, at the same budget and scheme.

    python benchmarks/retention.py [--model models/shapes-llava] [--bench calib_data/shapes/test.jsonl]
        [--samples N] [--calib calib_data/shapes/calib.jsonl] [--calib-samples 64]
        [--schemes w4a4kv4] [--budgets 0.3] [--out benchmarks/retention.md]

Per (scheme, budget): FP full tokens (the reference), FP with blank images (how much of the
score needs no image), the quantized model with all tokens, each stage-wise baseline (pruning
scored on the FP model, replayed in the quantized model) and QUOTA (calibrated here on the
calibration split, which shares no scene with the test split). Every row: mean kept fraction,
accuracy per task, overall, retention (mean over tasks of accuracy / FP accuracy), agreement
with the FP answer, and KL(P_fp || P) of the first answer token. Writes a Markdown report and
the calibrated recipes beside it (<out stem>_recipes/).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINES = ("fastv", "pdrop", "sparsevlm", "divprune", "random")


def _f(x, nd=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/shapes-llava")
    ap.add_argument("--bench", default="calib_data/shapes/test.jsonl")
    ap.add_argument("--samples", type=int, help="task-balanced slice of the bench (default: all)")
    ap.add_argument("--calib", default="calib_data/shapes/calib.jsonl")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schemes", nargs="+", default=["w4a4kv4"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.3])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "retention.md")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from quota_export.calibrate import calibrate, versions
    from quota_export.evaluate import Harness
    from quota_export.recipe import save_recipe

    progress = sys.stderr.isatty()
    t_start = time.perf_counter()
    # the trainer replaces the model folder while it runs: work on a snapshot
    import shutil
    import tempfile

    snap_root = Path(tempfile.mkdtemp(prefix="retention-model-"))
    snap = snap_root / Path(a.model).name
    for attempt in range(5):
        try:
            shutil.copytree(a.model, snap)
            break
        except (OSError, shutil.Error):
            shutil.rmtree(snap, ignore_errors=True)
            if attempt == 4:
                raise
            time.sleep(10)
    model_arg, a.model = a.model, str(snap)
    try:
        return _run(a, model_arg, progress, t_start, calibrate, versions, Harness, save_recipe)
    finally:
        shutil.rmtree(snap_root, ignore_errors=True)


def _run(a, model_arg, progress, t_start, calibrate, versions, Harness, save_recipe) -> int:
    h = Harness(a.model, a.bench, a.samples, progress=progress)
    tasks = list(dict.fromkeys(s.task for s in h.samples))
    rec_dir = a.out.with_name(a.out.stem + "_recipes")
    lines = [
        "# Retention: QUOTA vs stage-wise baselines",
        "",
        f"Model `{model_arg}` (training step {_model_step(a.model)}), bench `{a.bench}` ({len(h.samples)} samples, "
        f"task-balanced), QUOTA calibrated on `{a.calib}` ({a.calib_samples} samples, seed {a.seed}).",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions().items())}; python {platform.python_version()}; "
        f"{a.threads} thread(s).",
        "",
        "Retention = mean over tasks of accuracy / FP full-token accuracy. Agreement = same greedy answer "
        "as FP full-token. KL = mean KL(P_fp || P) of the first answer token (nats). Kept = mean fraction "
        "of visual tokens over all decoder layers. Baselines are stage-wise: pruning scored on the FP model's "
        "own stream, the quantized model (RTN weights) drops the same tokens.",
        "",
    ]

    def row(name, m, secs):
        per = " | ".join(_f(m["per_task"].get(t)) for t in tasks)
        return (f"| {name} | {_f(m['mean_kept'])} | {per} | {_f(m['overall'])} | {_f(m['retention'])} | "
                f"{_f(m['agreement'])} | {m['kl']:.4g} | {secs:.0f} |")

    head = ("| method | kept | " + " | ".join(tasks) + " | overall | retention | agreement | KL | s |\n"
            "|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|")

    def timed(fn):
        t = time.perf_counter()
        m = fn()
        return m, time.perf_counter() - t

    fp, fp_s = timed(lambda: h.evaluate("fp"))
    blank, blank_s = timed(lambda: h.evaluate("fp", blank=True))
    for scheme in a.schemes:
        full, full_s = timed(lambda: h.evaluate("none", scheme))
        for budget in a.budgets:
            print(f"[{scheme} budget {budget}] calibrating QUOTA ...", file=sys.stderr)
            t = time.perf_counter()
            recipe, res = calibrate(a.model, a.calib, budget, scheme, a.calib_samples, a.seed,
                                    name=f"bench-quota-{scheme}-b{budget:g}", progress=progress)
            cal_s = time.perf_counter() - t
            save_recipe(recipe.model_copy(update={"model": model_arg}), rec_dir / f"{recipe.name}.yaml")
            sched = ", ".join(f"L{s.layer}:{s.keep}" for s in recipe.pruning.stages)
            lines += [f"## {scheme}, budget {budget:g}", "",
                      f"QUOTA schedule {sched}; calibration divergence {res.divergence:.4g} "
                      f"(naive single stage at layer 0: {res.naive_divergence:.4g}); {res.evals} candidates, "
                      f"{cal_s:.0f} s.", "", head,
                      row("fp, full tokens (reference)", fp, fp_s),
                      row("fp, blank images", blank, blank_s),
                      row(f"{scheme}, full tokens", full, full_s)]
            for b in BASELINES:
                print(f"[{scheme} budget {budget}] {b} ...", file=sys.stderr)
                m, s = timed(lambda: h.evaluate(b, scheme, budget))
                lines.append(row(f"{scheme} + {b} (stage-wise)", m, s))
            m, s = timed(lambda: h.evaluate("quota", recipe=recipe))
            lines += [row(f"{scheme} + QUOTA", m, s), ""]
    lines.append(f"Total {time.perf_counter() - t_start:.0f} s.")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


def _model_step(path) -> str:
    import json

    for name in ("training.json",):
        p = Path(path) / name
        if p.is_file():
            try:
                return str(json.loads(p.read_text()).get("step", "?"))
            except (ValueError, OSError):
                return "?"
    return "?"


if __name__ == "__main__":
    sys.exit(main())
