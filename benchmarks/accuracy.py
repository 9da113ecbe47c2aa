"""The shipped model's accuracy table (the model card's): does the testbed tell methods apart?

    python benchmarks/accuracy.py [--model models/shapes-llava] [--bench calib_data/shapes/test.jsonl]
        [--samples N] [--recipe recipes/default.yaml] [--threads 1] [--out benchmarks/accuracy.md]

Rows, all on one task-balanced slice of the bench (`--samples`, default: all), greedy answers,
through `quota_export.evaluate.Harness` (what `python -m quota_export eval` runs):
  FP, all visual tokens; FP, blank images; FP, a random 30% of the visual tokens from layer 0;
  FP, last-token attention (FastV) at 30%; W4A16 and W4A4KV4 (RTN) at all tokens; and the
  recipe (QUOTA, W4A4KV4 at 30% by default).
Then the checks the benchmark issue asks of the testbed: FP >= 90% overall and >= 80% per task;
random 30% <= 85% of FP; blank images near chance on every task type; W4A4 and 70%
pruning change answers measurably (agreement with FP < 1).
The markdown goes to --out (and the table, unchanged, into the model card by hand).
Measured rows are kept in <out stem>_rows.json (git-ignored); `--reuse` takes the rows that do not
depend on the recipe from there when the model's weights (sha256) and settings match, e.g. to
redo the table for a new recipe in minutes.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("exist", "attribute", "count", "spatial", "choice", "digit")
# chance per task type on the shipped benchmark: yes/no, 6 colours, the majority count, 4
# relations, 4 letters, 10 digits (the blank-image row measures what the model really gets)
CHANCE = {"exist": 0.5, "attribute": 1 / 6, "count": 0.39, "spatial": 0.25, "choice": 0.25, "digit": 0.1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/shapes-llava")
    ap.add_argument("--bench", default="calib_data/shapes/test.jsonl")
    ap.add_argument("--samples", type=int, help="task-balanced slice of the bench (default: all)")
    ap.add_argument("--recipe", default="recipes/default.yaml")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "accuracy.md")
    ap.add_argument("--reuse", action="store_true",
                    help="take the recipe-independent rows from <out stem>_rows.json when measured on the same "
                         "model weights and slice")
    a = ap.parse_args(argv)

    import torch

    from quota_export.evaluate import Harness
    from quota_export.recipe import load_recipe

    torch.set_num_threads(a.threads)
    t0 = time.time()
    recipe = load_recipe(a.recipe)
    h = Harness(a.model, a.bench, a.samples, progress=True)
    rows = [
        ("FP, all visual tokens", dict(method="fp")),
        ("FP, blank images", dict(method="fp", blank=True)),
        ("FP, random 30% of the visual tokens from layer 0", dict(method="random", quant="fp", budget=0.3)),
        ("FP, last-token attention (FastV) 30%", dict(method="fastv", quant="fp", budget=0.3)),
        ("W4A16 (RTN), all tokens", dict(method="none", quant="w4a16")),
        ("W4A4KV4 (RTN, per-token activations), all tokens", dict(method="none", quant="w4a4kv4")),
        (f"`{Path(a.recipe).name}` ({recipe.name})", dict(method="quota", recipe=recipe)),
    ]
    from rowcache import RowCache

    rc = RowCache(a.out.with_name(a.out.stem + "_rows.json"), a.model, a.reuse)
    res = {}
    for name, kw in rows:
        if "recipe" in kw:
            res[name] = h.evaluate(**kw)
        else:
            res[name] = rc.measure([a.bench, a.samples, sorted(kw.items())], lambda: h.evaluate(**kw))[0]
        m = res[name]
        print(f"{name}: overall {m['overall']:.3f} retention {m['retention']:.3f} agreement {m['agreement']:.3f}", flush=True)
    fp, blank, rnd = (res[rows[i][0]] for i in range(3))
    w4a4 = res[rows[5][0]]
    n = fp["samples"]
    lines = [
        "# The shipped model's accuracy: does the testbed tell methods apart?",
        "",
        f"Command: `python benchmarks/accuracy.py --model {a.model} --bench {a.bench}"
        + (f" --samples {a.samples}" if a.samples else "") + f" --recipe {a.recipe}"
        + (" --threads " + str(a.threads) if a.threads != 1 else "") + "`. "
        f"{n} samples (task-balanced), greedy answers. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{(time.time() - t0) / 60:.1f} min on {platform.machine()}, {a.threads} thread(s)"
        + (f"; {rc.reused} row(s) measured by an earlier run on the same weights (`--reuse`)." if rc.reused else "."),
        "",
        "Retention = mean over task types of accuracy / FP accuracy; agreement and KL (first answer "
        "token) against the FP full-token answers.",
        "",
        "| setting | mean kept | " + " | ".join(TASKS) + " | overall | retention | agreement | KL |",
        "|---|---:|" + "---:|" * len(TASKS) + "---:|---:|---:|---:|",
    ]
    for name, _ in rows:
        m = res[name]
        lines.append(f"| {name} | {m['mean_kept']:.3f} | " + " | ".join(f"{m['per_task'][t]:.3f}" for t in TASKS)
                     + f" | **{m['overall']:.3f}** | {m['retention']:.3f} | {m['agreement']:.3f} | {m['kl']:.4f} |")
    low = [t for t in TASKS if fp["per_task"][t] < 0.8]
    image_tasks = TASKS  # every type needs the image (existence includes absent-object probes)
    near = [t for t in image_tasks if blank["per_task"][t] <= CHANCE[t] + 0.1]
    checks = [
        ("FP >= 0.90 overall and >= 0.80 on every task type", fp["overall"] >= 0.9 and not low,
         f"overall {fp['overall']:.3f}" + (f"; below 0.80: {', '.join(low)}" if low else "")),
        ("random 30% <= 0.85 x FP overall", rnd["overall"] <= 0.85 * fp["overall"],
         f"{rnd['overall']:.3f} = {rnd['overall'] / fp['overall']:.3f} x FP"),
        ("blank images at most 0.10 above chance on every task type", len(near) == len(image_tasks),
         ", ".join(f"{t} {blank['per_task'][t]:.2f} (chance {CHANCE[t]:.2f})" for t in image_tasks)),
        ("W4A4KV4 changes answers measurably (agreement < 1)", w4a4["agreement"] < 1,
         f"agreement {w4a4['agreement']:.3f}, KL {w4a4['kl']:.4f}"),
        ("70% pruning changes answers measurably", rnd["agreement"] < 1 and res[rows[3][0]]["agreement"] < 1,
         f"agreement random {rnd['agreement']:.3f}, FastV {res[rows[3][0]]['agreement']:.3f}"),
    ]
    lines += ["", "| check | met | measured |", "|---|---|---|"]
    lines += [f"| {c} | {'yes' if ok else '**no**'} | {why} |" for c, ok, why in checks]
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
