"""Two methods on the same samples: paired differences with bootstrap confidence intervals.

    python benchmarks/paired.py [--model models/shapes-llava] [--bench calib_data/shapes/test.jsonl]
        [--samples N] [--a recipe:recipes/default.yaml] [--b divprune+merge:w4a4kv4:0.3]
        [--side a|b|both] [--reuse] [--boot 2000] [--threads 1] [--out benchmarks/paired-default.md]

A method is `recipe:PATH` (a QUOTA recipe as written) or `METHOD[+merge]:QUANT:BUDGET` (a
stage-wise baseline of `eval`, e.g. `divprune+merge:w4a4kv4:0.3`). Both run on one task-balanced
slice of the bench, and per sample we keep: correct or not, the same for the FP full-token model,
agreement with the FP answer, and KL(P_fp || P) of the first answer token. Retention, agreement
and KL of A and B are then compared sample by sample: the difference A - B, with a 95% interval
from a paired bootstrap (`--boot` resamples, numpy seed 0; samples are drawn with replacement
within each task, so every resample keeps the task mix retention averages over), the share of
resamples in which A is better, and the samples only one of the two answers correctly. A
difference whose interval holds 0 is reported as none measured.

Slow rows can run in two processes: `--side a` and `--side b` each measure one method (per-sample
results go to `<out stem>_a_rows.json` / `_b_rows.json`, keyed by the model weights' sha256, the bench slice, the
method and, for a recipe, the recipe file's sha256; git-ignored), then `--reuse` (side both) reads
both and writes the report.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


DEFAULT_OUT = ROOT / "benchmarks" / "paired-default.md"


def _rel(p: Path) -> str:
    try:
        return Path(p).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(p)


def parse_method(spec: str) -> dict:
    """`recipe:PATH` or `METHOD[+merge]:QUANT:BUDGET` -> dict; exits with one line if malformed."""
    from quota_export.prune.baselines import METHODS as STAGEWISE

    kind, _, rest = spec.partition(":")
    if kind == "recipe":
        p = Path(rest)
        if not p.is_file():
            sys.exit(f"error: {spec}: recipe file {rest!r} not found")
        return {"spec": spec, "recipe": str(p), "sha": hashlib.sha256(p.read_bytes()).hexdigest()}
    parts = spec.split(":")
    method, merge = (parts[0][: -len("+merge")], True) if parts[0].endswith("+merge") else (parts[0], False)
    if len(parts) != 3 or method not in STAGEWISE:
        sys.exit(f"error: {spec}: expected recipe:PATH or METHOD[+merge]:QUANT:BUDGET with METHOD a stage-wise "
                 f"baseline")
    try:
        budget = float(parts[2])
    except ValueError:
        sys.exit(f"error: {spec}: budget {parts[2]!r} is not a number")
    return {"spec": spec, "method": method, "merge": merge, "quant": parts[1], "budget": budget}


def per_sample(h, m: dict) -> dict:
    """Run method `m` on harness `h`: per-sample lists (tasks, correct, fp_correct, agree, kl)."""
    from quota_export.evaluate import is_correct, kl_rows
    from quota_export.recipe import load_recipe

    if "recipe" in m:
        res = h.run("quota", recipe=load_recipe(m["recipe"]))
    else:
        res = h.run(m["method"], m["quant"], m["budget"], merge=m["merge"])
    ref = h.fp_reference()
    kl = kl_rows(ref.first_logp, res.first_logp)
    return {
        "tasks": [s.task for s in h.samples],
        "correct": [bool(is_correct(a, s.answer, s.options)) for a, s in zip(res.answers, h.samples)],
        "fp_correct": [bool(is_correct(a, s.answer, s.options)) for a, s in zip(ref.answers, h.samples)],
        "agree": [a == b for a, b in zip(res.answers, ref.answers)],
        "kl": [float(x) for x in kl],
        "mean_kept": res.mean_kept,
    }


def metrics(tasks, correct, fp_correct, agree, kl, idx):
    """(retention, agreement, kl) over the samples `idx` (retention: mean over tasks of acc / FP acc)."""
    import numpy as np

    r = []
    for t in np.unique(tasks):
        sel = idx[tasks[idx] == t]
        fa = fp_correct[sel].mean()
        if fa > 0:
            r.append(correct[sel].mean() / fa)
    return float(np.mean(r)), float(agree[idx].mean()), float(kl[idx].mean())


def paired(a: dict, b: dict, boot: int, seed: int = 0) -> dict:
    """Point values of A, B and A - B, and the bootstrap distribution of A - B (stratified by task)."""
    import numpy as np

    tasks = np.asarray(a["tasks"])
    if list(tasks) != list(b["tasks"]) or a["fp_correct"] != b["fp_correct"]:
        raise ValueError("the two methods were not measured on the same samples")
    fp = np.asarray(a["fp_correct"], bool)
    ca, cb = np.asarray(a["correct"], bool), np.asarray(b["correct"], bool)
    ga, gb = np.asarray(a["agree"], bool), np.asarray(b["agree"], bool)
    ka, kb = np.asarray(a["kl"], float), np.asarray(b["kl"], float)
    allidx = np.arange(len(tasks))
    pa = metrics(tasks, ca, fp, ga, ka, allidx)
    pb = metrics(tasks, cb, fp, gb, kb, allidx)
    groups = [allidx[tasks == t] for t in np.unique(tasks)]
    rng = np.random.default_rng(seed)
    diffs = np.empty((boot, 3))
    for i in range(boot):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        ma = metrics(tasks, ca, fp, ga, ka, idx)
        mb = metrics(tasks, cb, fp, gb, kb, idx)
        diffs[i] = np.subtract(ma, mb)
    return {"a": pa, "b": pb, "diff": tuple(x - y for x, y in zip(pa, pb)), "boot": diffs,
            "only_a": int((ca & ~cb).sum()), "only_b": int((cb & ~ca).sum()), "n": len(tasks)}


def verdict(d: float, lo: float, hi: float, higher_is_better: bool) -> str:
    if lo <= 0 <= hi:
        return "no difference measured (the interval holds 0)"
    better = (d > 0) == higher_is_better
    return "A better" if better else "B better"


def report(r: dict, a: dict, b: dict, args, secs: dict) -> str:
    import numpy as np

    names = ("retention", "agreement with FP", "KL(P_fp || P), first answer token")
    higher = (True, True, False)
    lines = [
        f"# Paired comparison: {a['spec']} vs {b['spec']}",
        "",
        f"`python benchmarks/paired.py --bench {args.bench}{f' --samples {args.samples}' if args.samples else ''} "
        f"--a {a['spec']} --b {b['spec']} --boot {args.boot}"
        f"{'' if args.out.resolve() == DEFAULT_OUT.resolve() else f' --out {_rel(args.out)}'}` on {platform.node() or 'this machine'} "
        f"({time.strftime('%Y-%m-%d', time.gmtime())}); model `{args.model}`; {r['n']} samples "
        f"({'a task-balanced slice' if args.samples else 'all of the bench'}); evaluation A {secs['a']:.0f} s, "
        f"B {secs['b']:.0f} s (a side measured first in its process includes the FP reference run).",
        "",
        "A - B per metric; interval: 95% paired bootstrap over samples (stratified by task, "
        f"{args.boot} resamples, seed 0); P(A better): share of resamples in which A is better.",
        "",
        "| metric | A | B | A - B | 95% interval | P(A better) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, (name, hb) in enumerate(zip(names, higher)):
        col = r["boot"][:, k]
        lo, hi = (float(x) for x in np.percentile(col, [2.5, 97.5]))
        p = float(((col > 0) if hb else (col < 0)).mean())
        d = r["diff"][k]
        nd = 4
        lines.append(f"| {name} | {r['a'][k]:.{nd}f} | {r['b'][k]:.{nd}f} | {d:+.{nd}f} | "
                     f"[{lo:+.{nd}f}, {hi:+.{nd}f}] | {p:.3f} | {verdict(d, lo, hi, hb)} |")
    lines += [
        "",
        f"Samples answered correctly by A only: {r['only_a']}; by B only: {r['only_b']} (of {r['n']}).",
        f"Mean kept fraction of visual tokens: A {a['rows']['mean_kept']:.4f}, B {b['rows']['mean_kept']:.4f}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/shapes-llava")
    ap.add_argument("--bench", default="calib_data/shapes/test.jsonl")
    ap.add_argument("--samples", type=int, help="task-balanced slice of the bench (default: all)")
    ap.add_argument("--a", default="recipe:recipes/default.yaml")
    ap.add_argument("--b", default="divprune+merge:w4a4kv4:0.3")
    ap.add_argument("--side", choices=("a", "b", "both"), default="both",
                    help="measure one side only (stored for a later --reuse), or both and write the report")
    ap.add_argument("--reuse", action="store_true", help="take sides already measured from <out stem>_{a,b}_rows.json")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.boot < 100:
        sys.exit("error: --boot: need at least 100 resamples")
    if not Path(args.bench).is_file():
        sys.exit(f"error: --bench: {args.bench} not found")

    import torch
    from rowcache import RowCache

    from quota_export import UserError
    from quota_export.evaluate import Harness

    torch.set_num_threads(args.threads)
    ma, mb = parse_method(args.a), parse_method(args.b)
    h = None
    secs = {}
    try:
        for side, m in (("a", ma), ("b", mb)):
            if args.side not in (side, "both"):
                continue
            key = ["paired", str(Path(args.bench).resolve().name), args.samples,
                   {k: v for k, v in m.items() if k not in ("spec", "recipe")}]

            def run(m=m):
                nonlocal h
                if h is None:
                    h = Harness(args.model, args.bench, args.samples, progress=sys.stderr.isatty())
                return per_sample(h, m)

            print(f"[{side}] {m['spec']} ...", flush=True)
            rc = RowCache(args.out.with_name(f"{args.out.stem}_{side}_rows.json"), args.model,
                          args.reuse or args.side != "both")
            m["rows"], secs[side] = rc.measure(key, run)
    except UserError as e:
        sys.exit(f"error: {e}")
    if args.side != "both":
        print(f"stored side {args.side} in {rc.path}")
        return 0
    r = paired(ma["rows"], mb["rows"], args.boot)
    text = report(r, ma, mb, args, secs)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
