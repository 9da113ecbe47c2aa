"""`python -m quota_export calibrate`: QUOTA calibration -> recipe YAML."""

from __future__ import annotations

import time
from pathlib import Path

from quota_export.__main__ import _progress, args, command
from quota_export.recipe import SIGNALS


def _calibrate_args(p):
    p.add_argument("--model", required=True, help="HF checkpoint folder")
    p.add_argument("--data", required=True, help="calibration JSONL (e.g. calib_data/shapes/calib.jsonl)")
    p.add_argument("--budget", required=True, type=float, help="mean fraction of visual tokens kept over all decoder layers")
    p.add_argument("--scheme", default="w4a4kv4", help="quantization preset (default w4a4kv4)")
    p.add_argument("--group-size", type=int, help="INT4/INT8 weight group size (default: the scheme's; TensorRT needs 64 or 128)")
    p.add_argument("--weights", choices=["rtn", "gptq"], default="rtn",
                   help="weight quantization (default rtn); gptq is calibrated on the pruned model's token streams "
                        "and written beside the recipe as <recipe stem>.weights.safetensors")
    p.add_argument("--signals", nargs="+", choices=list(SIGNALS), default=list(SIGNALS),
                   help="ablation: the score signals that may get a non-zero weight (default all four)")
    p.add_argument("--merge", choices=["proportional", "none"], default="proportional",
                   help="proportional (default): a dropped token is merged into its most similar kept token, whose "
                        "attention logits get + log(count); none: dropped tokens vanish (ablation)")
    p.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    p.add_argument("--seed", type=int, default=0, help="which samples (default 0)")
    p.add_argument("--name", help="recipe name (default <model>-quota-<scheme>-b<budget>)")
    p.add_argument("-o", "--out", required=True, type=Path, help="recipe YAML to write")


@command("calibrate", "QUOTA: calibration under the deployed quantizers -> recipe")
@args(_calibrate_args)
def cmd_calibrate(a) -> int:
    from quota_export.calibrate import calibrate
    from quota_export.recipe import save_recipe

    t0 = time.perf_counter()
    recipe, res = calibrate(a.model, a.data, a.budget, a.scheme, a.samples, a.seed, a.name, progress=_progress(),
                             group_size=a.group_size, weights=a.weights, signals=tuple(a.signals),
                             merge=a.merge)
    if res.weights is not None:
        from quota_export.qweights import save_with_recipe

        g, meta = res.weights
        recipe, wpath = save_with_recipe(recipe, g.qweights, meta, a.out)
        print(f"wrote {wpath} (GPTQ: layer output error {g.error_ratio():.4f} of RTN's on the calibration streams)")
    else:
        save_recipe(recipe, a.out)
    L = res.num_layers
    sched = ", ".join(f"L{s.layer}:{s.keep}{' max-min' if s.select == 'maxmin' else ''}" for s in recipe.pruning.stages) or "none"
    print(f"wrote {a.out} ({recipe.name})")
    print(f"schedule {sched}; mean kept {recipe.mean_keep_fraction(L):.4f} (budget {a.budget}); "
          f"divergence {res.divergence:.5g} (naive {res.naive_divergence:.5g}); "
          f"{res.evals} candidates, {time.perf_counter() - t0:.1f} s")
    return 0
