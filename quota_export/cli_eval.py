"""`python -m quota_export eval`: accuracy per task, retention and fidelity vs the FP full-token model."""

from __future__ import annotations

import json
import math
from pathlib import Path

from quota_export import UserError
from quota_export.__main__ import _progress, args, command


def _eval_args(p):
    from quota_export.evaluate import METHODS

    p.add_argument("--model", help="HF checkpoint folder (default: the recipe's model)")
    p.add_argument("--bench", required=True, help="benchmark JSONL")
    p.add_argument("--recipe", type=Path, help="recipe YAML (implies --method quota)")
    p.add_argument("--method", choices=METHODS, help="fp | none | quota | a stage-wise baseline")
    p.add_argument("--quant", help="scheme name for --method none and the baselines (e.g. w4a4kv4; "
                                   "w4a4kv4-gptq: GPTQ weights calibrated on full token streams of --calib)")
    p.add_argument("--calib", help="calibration JSONL for a -gptq scheme (64 task-balanced samples, seed 0)")
    p.add_argument("--budget", type=float, help="mean kept fraction of visual tokens (baselines)")
    p.add_argument("--samples", type=int, help="task-balanced slice of the benchmark (default: all)")
    p.add_argument("--blank", action="store_true", help="replace every image by a blank one (no-image control)")
    p.add_argument("--merge", action="store_true",
                   help="stage-wise baselines: merge each dropped token into its most similar kept token "
                        "(as pruning.merge: proportional; a recipe carries its own)")
    p.add_argument("--json", type=Path, help="write {overall, per_task, retention, agreement, kl} as JSON")


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


@command("eval", "benchmark accuracy, retention vs FP full-token, fidelity")
@args(_eval_args)
def cmd_eval(a) -> int:
    from quota_export.evaluate import Harness, json_report
    from quota_export.recipe import load_recipe

    recipe = load_recipe(a.recipe) if a.recipe else None
    method = a.method or ("quota" if recipe is not None else None)
    if method is None:
        raise UserError("give --recipe, or --method (with --quant and, for pruning methods, --budget)")
    if method == "quota" and recipe is None:
        raise UserError("--method quota needs --recipe")
    if recipe is not None and method != "quota":
        raise UserError(f"--recipe is only used with --method quota, not {method}")
    if recipe is not None and (a.quant or a.budget is not None):
        raise UserError("--quant and --budget come from the recipe; drop them")
    model = a.model or (recipe.model if recipe is not None else None)
    if model is None:
        raise UserError("--model is required without --recipe")
    if a.samples is not None and a.samples < 1:
        raise UserError(f"--samples: {a.samples} must be >= 1")
    h = Harness(model, a.bench, a.samples, progress=_progress(), calib=a.calib)
    m = h.evaluate(method, a.quant, a.budget, recipe, a.blank, a.merge)
    what = recipe.name if recipe is not None else f"{method}" + (" + merge" if a.merge else "") + (
        f" {a.quant}" if a.quant else "") + (f" budget {a.budget:g}" if a.budget is not None else "")
    print(f"{what}{' (blank images)' if a.blank else ''}: {m['samples']} samples, mean kept {m['mean_kept']:.4f}")
    w = max(len(t) for t in m["per_task"])
    print(f"  {'task':<{w}}  accuracy  fp")
    for t, acc in m["per_task"].items():
        print(f"  {t:<{w}}  {acc:8.4f}  {m['fp_per_task'][t]:.4f}")
    print(f"  {'overall':<{w}}  {m['overall']:8.4f}")
    print(f"retention {_fmt(m['retention'])}  agreement {_fmt(m['agreement'])}  kl {m['kl']:.5g}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(json_report(m), indent=1) + "\n")
    return 0
