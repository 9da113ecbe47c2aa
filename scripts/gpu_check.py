"""The GPU check after the installs (scripts/gpu_check.sh): builds, gpu tests, parity and timings per
backend, one summary table. Every step that cannot run here is reported with the reason.

    python scripts/gpu_check.py [--dry-run] [--recipe R] [--bench JSONL] [--samples N] [--out DIR]

1. builds the recipe for both targets (`build`, as the CLI does), or reuses builds of the same recipe
   already there (graphs/<name>/, graphs/<name>-tensorrt/); a tensorrt build without engines is
   rebuilt where engines can now be built;
2. runs the `gpu`-marked tests (`pytest -m gpu -rs`) and lists what they skipped and why;
3. parity vs the PyTorch reference (verify.compare through the polygraphy runners) per backend:
   ort-cpu and ort-cuda on both builds, tensorrt on the tensorrt build's engines;
4. prefill ms (median) and decode ms per token (median) per backend, measured on the same samples
   (one warm-up sample first);
5. with ort-cuda: which nodes ONNX Runtime placed on the CPU EP, from its own verbose log;
6. prints the summary table and writes <out>/gpu_check/summary.{json,md}. Exit 0 when everything
   that ran passed, 1 otherwise (skips are not failures).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _row(rows, step, backend, status, detail="", prefill_ms=None, decode_ms=None):
    rows.append({"step": step, "backend": backend, "status": status, "detail": detail,
                 "prefill_ms": prefill_ms, "decode_ms": decode_ms})
    print(f"[gpu_check] {step} {backend}: {status}{' - ' + detail if detail else ''}", file=sys.stderr, flush=True)


def _reusable(out: Path, recipe, target: str) -> str | None:
    """Why the build at `out` can be reused (None: build it)."""
    from quota_export.lower.tensorrt_target import engine_unavailable_reason

    try:
        man = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if man.get("recipe_hash") != recipe.content_hash() or man.get("target") != target:
        return None
    sets = [man] if "sets" not in man else [json.loads((out / s["dir"] / "manifest.json").read_text()) for s in man["sets"]]
    if target == "tensorrt" and not all((m.get("engines") or {}).get("built") for m in sets):
        if engine_unavailable_reason() is None:
            return None  # engines can be built now: rebuild
    return "exists (same recipe hash)"


def build_step(rows, recipe_path: Path, recipe, target: str, out: Path, bench: str, samples: int, logs: Path) -> Path | None:
    """Build (or reuse) one target; -> the build folder, None if there is none."""
    step = f"build {target}"
    why = _reusable(out, recipe, target)
    if why:
        _row(rows, step, "-", "reused", f"{out}: {why}")
        return out
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "quota_export", "build", "--recipe", str(recipe_path), "--target", target,
           "--out", str(out), "--bench", bench, "--samples", str(samples)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (logs / f"build-{target}.log").write_text(p.stdout + p.stderr)
    secs = time.monotonic() - t0
    err = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    if p.returncode == 0:
        _row(rows, step, "-", "ran", f"{out} in {secs:.0f} s")
        return out
    if p.returncode == 3 and target == "tensorrt" and (out / "manifest.json").is_file():
        # the TensorRT-ready graphs are written and checked on ONNX Runtime; no engines here
        _row(rows, step, "-", "ran", f"{out} in {secs:.0f} s: graphs only")
        _row(rows, "engines", "tensorrt", "skipped", err[-1][len("error: "):] if err else "no engine built")
        return out
    _row(rows, step, "-", "failed", f"exit {p.returncode}: {err[-1] if err else 'see ' + str(logs)}")
    return None


def gpu_tests_step(rows, logs: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider"],
                       cwd=ROOT, capture_output=True, text=True)
    (logs / "pytest-gpu.log").write_text(p.stdout + p.stderr)
    tail = [x for x in p.stdout.splitlines() if x.strip()][-1:] or ["no output"]
    counts = tail[0].strip("= ")
    skips = [re.sub(r"^SKIPPED \[\d+\] ", "", x) for x in p.stdout.splitlines() if x.startswith("SKIPPED")]
    ok = p.returncode in (0, 5)  # 5: nothing collected
    _row(rows, "pytest -m gpu", "-", "ran" if ok else "failed", counts)
    for s in skips:
        _row(rows, "  skipped test", "-", "skipped", s)


def _timed(runner):
    """Wrap runner._run to record per-graph call times (ms)."""
    times = {"prefill.onnx": [], "decode.onnx": []}
    run = runner._run

    def timed(g, feeds):
        t0 = time.perf_counter()
        out = run(g, feeds)
        if g in times:
            times[g].append((time.perf_counter() - t0) * 1e3)
        return out

    runner._run = timed
    return times


def parity_step(rows, backend: str, folder: Path, label: str, bench: str, samples: int) -> bool:
    """Parity of one build on one backend, and its prefill / decode ms; False if it failed."""
    from quota_export.build import deployed_at, load_items, load_model
    from quota_export.recipe import load_recipe
    from quota_export.runtime.ort import graph_sets
    from quota_export.runtime.runners import GraphRunner, backend_unavailable_reason
    from quota_export.verify import compare, summary_line, thresholds_for

    step = f"parity {label}"
    reason = backend_unavailable_reason(backend)
    if reason is None and backend == "tensorrt" and not (json.loads((folder / "manifest.json").read_text())
                                                         .get("engines") or {}).get("built"):
        reason = "the build holds no engines"
    if reason:
        _row(rows, step, backend, "skipped", reason)
        return True
    ok = True
    for (h, w), sub in graph_sets(folder):
        recipe = load_recipe(sub / "recipe.yaml")
        base = load_model(recipe)
        runner = GraphRunner(sub, backend)
        data = load_items(bench, samples, runner.image_size, resize=sub != folder)
        _, dep = deployed_at(recipe, base, (h, w) if recipe.export.image_sizes else None, fp64=True)
        runner.generate(*data.items[0])  # warm-up (first-run allocations, CUDA / TensorRT context)
        times = _timed(runner)
        rep = compare(runner, dep, data.items, recipe.export.max_new_tokens, progress=False, ids=data.ids)
        fails = rep.failures(thresholds_for(runner.manifest.get("reductions", "fp64")))
        pre = statistics.median(times["prefill.onnx"])
        dec = statistics.median(times["decode.onnx"]) if times["decode.onnx"] else None
        detail = summary_line(rep.as_dict(), data.source) + ("; FAILED: " + "; ".join(fails) if fails else "")
        _row(rows, step + ("" if sub == folder else f" {w}x{h}"), backend, "failed" if fails else "ran", detail,
             round(pre, 2), None if dec is None else round(dec, 2))
        ok = ok and not fails
        runner.close()
    return ok


def cuda_placement_step(rows, folder: Path, logs: Path) -> None:
    """Which nodes ONNX Runtime puts on the CPU EP with the CUDA EP first (its verbose log)."""
    from quota_export.runtime.runners import backend_unavailable_reason

    reason = backend_unavailable_reason("ort-cuda")
    if reason:
        _row(rows, "CUDA EP placement", "ort-cuda", "skipped", reason)
        return
    code = ("import sys, onnxruntime as ort\n"
            "from quota_export.runtime.ort import SESSION_CONFIG\n"
            "from quota_export.runtime.runners import PROVIDERS\n"
            "so = ort.SessionOptions(); so.log_severity_level = 0\n"
            "[so.add_session_config_entry(k, v) for k, v in SESSION_CONFIG.items()]\n"
            "for g in sys.argv[1:]: ort.InferenceSession(g, so, providers=PROVIDERS['ort-cuda'])\n")
    graphs = [str(folder / g) for g in ("vision.onnx", "prefill.onnx", "decode.onnx")]
    p = subprocess.run([sys.executable, "-c", code, *graphs], cwd=ROOT, capture_output=True, text=True)
    log = p.stdout + p.stderr
    (logs / "cuda-placement.log").write_text(log)
    lines = [x for x in log.splitlines() if "placed on [CPUExecutionProvider]" in x or "Node(s) placed on" in x]
    _row(rows, "CUDA EP placement", "ort-cuda", "ran" if p.returncode == 0 else "failed",
         "; ".join(x.split("]", 1)[-1].strip() for x in lines) or "no CPU placement lines in the verbose log "
         f"(see {logs / 'cuda-placement.log'})")


def table(rows) -> str:
    def ms(x):
        return "" if x is None else f"{x:.2f}"

    out = ["| step | backend | status | detail | prefill ms | decode ms/token |", "|---|---|---|---|---|---|"]
    out += [f"| {r['step'].strip()} | {r['backend']} | {r['status']} | {r['detail'].replace('|', '/')} | "
            f"{ms(r['prefill_ms'])} | {ms(r['decode_ms'])} |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU-only run (CI): nothing was installed")
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "default.yaml")
    ap.add_argument("--bench", default=str(ROOT / "calib_data" / "shapes" / "test.jsonl"))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "graphs", help="where the builds live (default graphs/)")
    ap.add_argument("--steps", type=Path, help="JSON lines of steps already done by gpu_check.sh (installs)")
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from quota_export import UserError
    from quota_export.recipe import load_recipe

    t0 = time.monotonic()
    rows = [json.loads(x) for x in a.steps.read_text().splitlines() if x.strip()] if a.steps and a.steps.is_file() else []
    logs = a.out / "gpu_check"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        recipe = load_recipe(a.recipe)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    onnx_dir = build_step(rows, a.recipe, recipe, "onnx", a.out / recipe.name, a.bench, a.samples, logs)
    trt_dir = build_step(rows, a.recipe, recipe, "tensorrt", a.out / f"{recipe.name}-tensorrt", a.bench, a.samples, logs)
    gpu_tests_step(rows, logs)
    ok = all(r["status"] != "failed" for r in rows)
    for backend in ("ort-cpu", "ort-cuda", "tensorrt"):
        if onnx_dir and backend != "tensorrt":
            ok &= parity_step(rows, backend, onnx_dir, "onnx build", a.bench, a.samples)
        if trt_dir:
            ok &= parity_step(rows, backend, trt_dir, "tensorrt build", a.bench, a.samples)
    if onnx_dir:
        cuda_placement_step(rows, onnx_dir, logs)
    ok = ok and all(r["status"] != "failed" for r in rows)
    md = table(rows)
    mode = "dry run (CPU only, nothing installed)" if a.dry_run else "full run"
    head = f"GPU check, {mode}: {recipe.name}, {a.samples} samples, {time.monotonic() - t0:.0f} s"
    print(head + "\n\n" + md)
    (logs / "summary.md").write_text(f"{head}\n\n{md}\n")
    (logs / "summary.json").write_text(json.dumps({"dry_run": a.dry_run, "ok": ok, "rows": rows}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
