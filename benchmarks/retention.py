"""Quality retention of QUOTA vs the stage-wise baselines, at the same budget and scheme.

    python benchmarks/retention.py [--model models/shapes-llava] [--bench calib_data/shapes/test.jsonl]
        [--samples N [N ...]] [--calib calib_data/shapes/calib.jsonl] [--calib-samples 64]
        [--schemes w4a4kv4] [--budgets 0.3 0.5 0.15] [--ablations-at B ...] [--ablations A ...] [--threads 1]
        [--reuse] [--recipe R] [--out benchmarks/retention.md]

Per (scheme, budget), on a task-balanced slice of the bench (`--samples`: one count for every
budget, or one per budget in the order of --budgets):
  fp, full tokens (the reference); fp, blank images (how much of the score needs no image);
  <scheme>, full tokens (RTN) and <scheme>-gptq, full tokens (GPTQ calibrated on full streams);
  QUOTA (RTN weights) and QUOTA + GPTQ calibrated on its own pruned, quantized streams (one
  schedule search, calibrated here on the calibration split, which shares no scene with the test
  split);
  each stage-wise baseline (pruning scored on the FP model, replayed in the quantized model) with
  RTN weights and with GPTQ calibrated on full, unpruned streams (<scheme>-gptq), each also with
  the token merging QUOTA recipes use (`+ merge`: `eval --merge`), which separates what merging
  brings from what the joint calibration brings;
  ablations (--ablations, default all): QUOTA without magnitude / attention / risk / diversity (the
  calibration search with that signal's score weight fixed at 0: calibrate(signals=...)), RTN
  weights; QUOTA without merging (dropped tokens vanish: calibrate(merge="none")), RTN weights; and
  QUOTA's schedule with stage-wise quantizer calibration (the QUOTA schedule, GPTQ weights
  calibrated on full streams, i.e. the same weights as <scheme>-gptq).
Every row: mean kept fraction, accuracy per task, overall, retention (mean over tasks of accuracy
/ FP accuracy), agreement with the FP answer, KL(P_fp || P) of the first answer token, seconds.
The report is rewritten after each budget (a partial run leaves a valid partial table) and ends
with a summary: QUOTA vs the best stage-wise combination per budget. Calibrated recipes (and
GPTQ weight files) go beside it in <out stem>_recipes/ (git-ignored: the weight files are MBs);
`--reuse` takes the recipes already there (checked: same model path and weights, calibration data,
samples, seed) instead of calibrating again, and the rows already measured (`rows.json` there, keyed
by the sha256 of the model's weights, the bench slice, the calibration split, the row's method,
quantization, budget and merging, and the package version), e.g. to add rows to a report or to
evaluate a new recipe without repeating hours of search and evaluation; a reused row keeps the
seconds it took when it was measured.
`--recipe R` evaluates a QUOTA recipe calibrated elsewhere (e.g. `recipes/default.yaml`) in place
of this script's own search: its budget and scheme become the only ones run, the QUOTA row is
that recipe as written (a `+ GPTQ` row only if its weights are GPTQ-calibrated), and of the
ablations only `schedule` applies (the others are searches of their own).
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

from quota_export.recipe import SIGNALS  # noqa: E402  (after the sys.path line above)

BASELINES = ("fastv", "pdrop", "sparsevlm", "divprune", "random")
ABLATIONS = (*SIGNALS, "merge", "schedule")


def _weights(st) -> str:
    """(m, a, r, d) = the stage's score weights, or "max-min" for a `select: maxmin` stage."""
    if st.select == "maxmin":
        return "max-min"
    w = st.weights
    return f"({w.magnitude:g}, {w.attention:g}, {w.risk:g}, {w.diversity:g})"


def _f(x, nd=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/shapes-llava")
    ap.add_argument("--bench", default="calib_data/shapes/test.jsonl")
    ap.add_argument("--samples", type=int, nargs="+",
                    help="task-balanced slice of the bench: one count, or one per budget (default: all)")
    ap.add_argument("--calib", default="calib_data/shapes/calib.jsonl")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schemes", nargs="+", default=["w4a4kv4"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5, 0.15])
    ap.add_argument("--ablations-at", nargs="*", type=float,
                    help="budgets that get the ablation rows (default: every budget; the flag with no value: no ablations)")
    ap.add_argument("--ablations", nargs="+", choices=ABLATIONS, default=list(ABLATIONS),
                    help="which ablations (default all): a signal = QUOTA without it, merge = QUOTA without "
                         "merging, schedule = QUOTA's schedule with GPTQ on full streams")
    ap.add_argument("--note", action="append", default=[], help="a line for the top of the report (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the calibrated recipes and measured rows already in <out stem>_recipes/ (same model "
                         "weights, calibration data, samples and seed) instead of calibrating and evaluating "
                         "again; the report says so")
    ap.add_argument("--recipe", type=Path, default=None,
                    help="evaluate this QUOTA recipe instead of calibrating one (its budget and scheme only; "
                         "of the ablations only `schedule`)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "retention.md")
    a = ap.parse_args(argv)
    if a.recipe is not None:
        from quota_export import UserError
        from quota_export.recipe import load_recipe

        try:
            given = load_recipe(a.recipe)
        except UserError as e:
            ap.error(f"--recipe: {e}")
        if given.pruning is None or not given.pruning.stages:
            ap.error(f"--recipe: {a.recipe} prunes no visual tokens (pruning.stages is empty)")
        a.budgets, a.schemes = [given.pruning.budget], [given.quant.scheme]
        a.ablations = [x for x in a.ablations if x == "schedule"]
    if a.samples is None:
        a.samples = [None] * len(a.budgets)
    elif len(a.samples) == 1:
        a.samples = a.samples * len(a.budgets)
    elif len(a.samples) != len(a.budgets):
        ap.error("--samples: give one count or one per budget")

    import torch

    torch.set_num_threads(a.threads)

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
        return _run(a, model_arg, progress, t_start)
    finally:
        shutil.rmtree(snap_root, ignore_errors=True)


def _timed(fn):
    t = time.perf_counter()
    m = fn()
    return m, time.perf_counter() - t


def _rtn_recipe(recipe):
    """The same recipe with RTN weights (the schedule search itself always runs with RTN)."""
    from quota_export.recipe import Quant

    w = recipe.quant.weights
    if w is None:
        return recipe
    w = w.model_copy(update={"algorithm": "rtn", "calibrated": None})
    return recipe.model_copy(update={"quant": Quant(scheme=recipe.quant.scheme, weights=w)}, deep=True)


def _run(a, model_arg, progress, t_start) -> int:
    from quota_export import versions
    from quota_export.calibrate import calibrate
    from quota_export.evaluate import Harness
    from quota_export.qweights import save_with_recipe
    from quota_export.recipe import load_recipe, save_recipe
    from quota_export.reference import DeployConfig, Deployed

    rec_dir = a.out.with_name(a.out.stem + "_recipes")
    rec_dir.mkdir(parents=True, exist_ok=True)
    harnesses: dict = {}
    shared: dict = {}  # per (samples, key): metrics of rows that do not depend on the budget

    def harness(n):
        if n not in harnesses:
            harnesses[n] = Harness(a.model, a.bench, n, progress=progress, calib=a.calib,
                                   calib_samples=a.calib_samples, calib_seed=a.seed)
        return harnesses[n]

    from rowcache import RowCache

    rc = RowCache(rec_dir / "rows.json", a.model, a.reuse)
    weights_sha = rc.sha

    def stamp(path: Path):
        """Record which model weights the recipe at `path` was calibrated on (checked by --reuse)."""
        path.with_suffix(".sha256").write_text(weights_sha + "\n")

    def measured(n, key, fn):
        """(metrics, seconds) of a row: from rows.json with --reuse when this exact row was measured
        there, else evaluated now (and recorded for later runs)."""
        return rc.measure([a.bench, n, a.calib, a.calib_samples, a.seed, key], fn)

    def once(n, key, fn):
        if (n, key) not in shared:
            shared[(n, key)] = measured(n, key, fn)
        return shared[(n, key)]

    h0 = harness(a.samples[0])
    tasks = list(dict.fromkeys(s.task for s in h0.samples))
    head_lines = [
        "# Retention: QUOTA vs stage-wise baselines",
        "",
        *a.note,
        *([""] if a.note else []),
        f"Model `{model_arg}` (training step {_model_step(a.model)}), bench `{a.bench}` (task-balanced slices: "
        + ", ".join(f"budget {b:g}: {n if n else 'all'} samples" for b, n in zip(a.budgets, a.samples))
        + f"), {'GPTQ (full streams)' if a.recipe else 'QUOTA and GPTQ'} calibrated on `{a.calib}` ({a.calib_samples} samples, seed {a.seed}).",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions().items())}; python {platform.python_version()}; "
        f"{a.threads} thread(s).",
        "",
        "Retention = mean over tasks of accuracy / FP full-token accuracy. Agreement = same greedy answer "
        "as FP full-token. KL = mean KL(P_fp || P) of the first answer token (nats). Kept = mean fraction "
        "of visual tokens over all decoder layers. Stage-wise baselines: pruning scored on the FP model's "
        "own stream, the quantized model drops the same tokens; weights RTN, or GPTQ calibrated on the "
        "full (unpruned) token streams (`-gptq`); `+ merge`: the same, with each dropped token merged into its "
        "most similar kept token in the FP selection pass and in the quantized model, as QUOTA recipes do "
        "(`eval --merge`). QUOTA: schedule and score weights searched under the "
        "deployed quantizers (RTN); `+ GPTQ (pruned streams)` = GPTQ calibrated on the streams of that "
        "pruned, quantized model; dropped tokens are merged into their most similar kept token "
        "(`pruning.merge: proportional`). Ablations: the QUOTA search with one signal's score weight fixed at 0 "
        "(`calibrate(signals=...)`, RTN weights), without merging (`merge: none`), and QUOTA's schedule with stage-wise quantizer "
        "calibration (GPTQ on full streams, the `-gptq` weights). s = wall seconds of the row's "
        "evaluation (calibration time is given above each table).",
        "",
    ]
    sections: list[str] = []
    summary: list[str] = []

    def row(name, m, secs):
        per = " | ".join(_f(m["per_task"].get(t)) for t in tasks)
        return (f"| {name} | {_f(m['mean_kept'])} | {per} | {_f(m['overall'])} | {_f(m['retention'])} | "
                f"{_f(m['agreement'])} | {m['kl']:.4g} | {secs:.0f} |")

    head = ("| method | kept | " + " | ".join(tasks) + " | overall | retention | agreement | KL | s |\n"
            "|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|")

    def write(final=False):
        reuse_note = (f" {rc.reused} row(s) taken from an earlier run's measurements (`--reuse`, same model "
                      f"weights and settings; their s is the time they took then).") if rc.reused else ""
        tail = [f"Total {time.perf_counter() - t_start:.0f} s.{reuse_note}"] if final else [
            f"**Partial report** (run in progress or stopped; {time.perf_counter() - t_start:.0f} s so far)."]
        body = head_lines + sections
        if summary:
            body += ["## Summary: QUOTA vs the best stage-wise combination", "",
                     "Best stage-wise = the highest retention (and, separately, the lowest KL) over all "
                     f"{4 * len(BASELINES)} stage-wise rows (5 pruners x RTN/GPTQ-full x without/with merging) "
                     "at that budget. "
                     "QUOTA wins if its retention is >= and its KL <= the best stage-wise values.", "",
                     "| scheme | budget | samples | QUOTA variant | retention | best stage-wise retention | ratio "
                     "| KL | best stage-wise KL | KL ratio | wins? |",
                     "|---|---|---|---|---|---|---|---|---|---|---|", *summary, ""]
        a.out.write_text("\n".join(body + tail) + "\n")

    def say(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    def reused(path: Path):
        """With --reuse, the recipe an earlier run calibrated at `path` (None if absent); one that was
        calibrated on another model, data, sample count or seed stops the run."""
        if not (a.reuse and path.exists()):
            return None
        r = load_recipe(path)
        c = r.calibration
        sha = path.with_suffix(".sha256")
        got = (r.model, c.data, c.samples, c.seed, sha.read_text().strip() if sha.exists() else None) if c else None
        want = (model_arg, a.calib, a.calib_samples, a.seed, weights_sha)
        if got != want:
            sys.exit(f"error: --reuse: {path} was calibrated with (model, data, samples, seed, weights sha256) = {got}, "
                     f"this run uses {want}; remove the file or drop --reuse")
        say(f"reusing {path}")
        return r

    for scheme in a.schemes:
        gscheme = f"{scheme}-gptq"
        for budget, n in zip(a.budgets, a.samples):
            h = harness(n)
            tag = f"{scheme}-b{budget:g}"
            if a.recipe is not None:
                given = load_recipe(a.recipe)
                c = given.calibration
                cal_line = (f"QUOTA recipe `{a.recipe}` (`{given.name}`, not calibrated by this run"
                            + (f"; calibrated on `{c.data}`, {c.samples} samples, seed {c.seed}, divergence "
                               f"{c.divergence:.4g}" if c is not None and c.divergence is not None else "")
                            + f"; weight group size {given.quant.weights.group_size if given.quant.weights else '-'}"
                            + f"; merge: {given.pruning.merge}).")
                w = given.quant.weights
                rg = given if w is not None and w.algorithm == "gptq" and w.calibrated else None
                rr = _rtn_recipe(given)
            else:
                rpath = rec_dir / f"bench-quota-{tag}-gptq.yaml"
                rg = reused(rpath)
                if rg is None:
                    say(f"[{tag}] calibrating QUOTA (+ GPTQ on its pruned streams) ...")
                    t = time.perf_counter()
                    rg, res = calibrate(a.model, a.calib, budget, scheme, a.calib_samples, a.seed,
                                        name=f"bench-quota-{tag}-gptq", progress=progress, weights="gptq")
                    cal_s = time.perf_counter() - t
                    g, meta = res.weights
                    rg = rg.model_copy(update={"model": model_arg})
                    save_with_recipe(rg, g.qweights, meta, rpath)
                    stamp(rpath)
                    cal_line = (f"calibration divergence {res.divergence:.4g} (naive single stage at layer 0: "
                                f"{res.naive_divergence:.4g}); {res.evals} candidates; GPTQ on the pruned streams: "
                                f"layer output error {g.error_ratio():.4f} of RTN's; search + GPTQ {cal_s:.0f} s.")
                else:
                    cal_line = (f"calibration divergence {rg.calibration.divergence:.4g} ({rg.calibration.notes}); "
                                "recipe reused from an earlier run of this script (`--reuse`).")
                rg = load_recipe(rpath)  # the weights file is found beside the recipe
                rr = _rtn_recipe(rg).model_copy(update={"name": f"bench-quota-{tag}"})
                save_recipe(rr, rec_dir / f"bench-quota-{tag}.yaml")
            sched = ", ".join(f"L{s.layer}:{s.keep}" for s in rr.pruning.stages)
            wts = "; ".join(f"L{s.layer} (m, a, r, d) = {_weights(s)}" for s in rr.pruning.stages)

            say(f"[{tag}] reference rows ...")
            fp, fp_s = once(n, "fp", lambda: h.evaluate("fp"))
            blank, blank_s = once(n, "blank", lambda: h.evaluate("fp", blank=True))
            full, full_s = once(n, scheme, lambda: h.evaluate("none", scheme))
            fullg, fullg_s = once(n, gscheme, lambda: h.evaluate("none", gscheme))
            rows = [row("fp, full tokens (reference)", fp, fp_s),
                    row("fp, blank images", blank, blank_s),
                    row(f"{scheme}, full tokens (RTN)", full, full_s),
                    row(f"{gscheme}, full tokens (GPTQ on full streams)", fullg, fullg_s)]
            base_ms = []
            for q in (scheme, gscheme):
                for b in BASELINES:
                    say(f"[{tag}] {b} {q} ...")
                    m, s = measured(n, [b, q, budget, False], lambda: h.evaluate(b, q, budget))
                    base_ms.append((f"{q} + {b}", m))
                    rows.append(row(f"{q} + {b} (stage-wise)", m, s))
            for q in (scheme, gscheme):
                for b in BASELINES:
                    say(f"[{tag}] {b} + merge {q} ...")
                    m, s = measured(n, [b, q, budget, True], lambda: h.evaluate(b, q, budget, merge=True))
                    base_ms.append((f"{q} + {b} + merge", m))
                    rows.append(row(f"{q} + {b} + merge (stage-wise)", m, s))
            say(f"[{tag}] QUOTA ...")
            mq, sq = _timed(lambda: h.evaluate("quota", recipe=rr))
            rows.append(row(f"{scheme} + QUOTA (RTN)", mq, sq))
            variants = [("RTN", mq)]
            if rg is not None:
                mg, sg = _timed(lambda: h.evaluate("quota", recipe=rg))
                rows.append(row(f"{scheme} + QUOTA + GPTQ (pruned streams)", mg, sg))
                variants.append(("GPTQ (pruned streams)", mg))
            abl_notes = []
            if a.ablations_at is None or any(abs(budget - x) < 1e-9 for x in a.ablations_at):
                for drop in [x for x in ABLATIONS if x in a.ablations and x != "schedule"]:
                    keep = tuple(x for x in SIGNALS if x != drop)
                    say(f"[{tag}] ablation: QUOTA without {drop} ...")
                    apath = rec_dir / f"bench-quota-{tag}-no-{drop}.yaml"
                    ra = reused(apath)
                    if ra is None:
                        t = time.perf_counter()
                        ra, _ = calibrate(a.model, a.calib, budget, scheme, a.calib_samples, a.seed,
                                             name=f"bench-quota-{tag}-no-{drop}", progress=progress, signals=keep,
                                             merge="none" if drop == "merge" else "proportional")
                        how = f"{time.perf_counter() - t:.0f} s"
                        ra = ra.model_copy(update={"model": model_arg})
                        save_recipe(ra, apath)
                        stamp(apath)
                    else:
                        how = "reused (`--reuse`)"
                    m, s = _timed(lambda: h.evaluate("quota", recipe=ra))
                    rows.append(row(f"ablation: QUOTA without {drop} (RTN)", m, s))
                    abl_notes.append(
                        f"without {drop}: schedule " + ", ".join(
                            f"L{st.layer}:{st.keep} {_weights(st)}" for st in ra.pruning.stages)
                        + f", divergence {ra.calibration.divergence:.4g}, {how}")
                if "schedule" in a.ablations:
                    say(f"[{tag}] ablation: QUOTA schedule + GPTQ on full streams ...")

                    def sched_fullgptq():
                        dep = Deployed(h.adapter, DeployConfig.from_recipe(rr), h.deployed(gscheme).qweights)
                        return h.score(h._generate(dep, h.prompts(False), desc="eval quota schedule + gptq full"))

                    m, s = _timed(sched_fullgptq)
                    rows.append(row("ablation: QUOTA schedule + GPTQ on full streams (stage-wise quantizer)", m, s))
            sections += [
                f"## {scheme}, budget {budget:g} ({len(h.samples)} test samples)", "",
                f"QUOTA schedule {sched}; score weights {wts}; {cal_line}", "",
                *([f"Ablation calibrations: {'; '.join(abl_notes)}.", ""] if abl_notes else []),
                head, *rows, ""]
            best_r = max(base_ms, key=lambda x: x[1]["retention"])
            best_k = min(base_ms, key=lambda x: x[1]["kl"])
            for label, m in variants:
                wins = m["retention"] >= best_r[1]["retention"] and m["kl"] <= best_k[1]["kl"]
                summary.append(
                    f"| {scheme} | {budget:g} | {len(h.samples)} | QUOTA {label} | {_f(m['retention'])} | "
                    f"{_f(best_r[1]['retention'])} ({best_r[0]}) | {m['retention'] / best_r[1]['retention']:.3f} | "
                    f"{m['kl']:.4g} | {best_k[1]['kl']:.4g} ({best_k[0]}) | {m['kl'] / best_k[1]['kl']:.3f} | "
                    f"{'yes' if wins else 'no'} |")
            write()
            say(f"[{tag}] done; wrote {a.out}")
    write(final=True)
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
