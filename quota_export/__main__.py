"""CLI: python -m quota_export {calibrate,build,verify,run,eval,report} ...

Thin: parse, call, print. Bad input ends in one `error: ...` line and exit code 2; graphs that
disagree with the PyTorch reference (`build`'s parity check, `verify`) end in exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from quota_export import UserError, memtrace

if __name__ == "__main__":
    # `python -m quota_export` runs this file as `__main__`; the cli_* modules import
    # `quota_export.__main__` to register their commands: make that the same module.
    sys.modules.setdefault("quota_export.__main__", sys.modules[__name__])

COMMANDS: dict[str, tuple[str, callable, callable]] = {}


def command(name: str, help: str):
    def deco(fn):
        COMMANDS[name] = (help, fn, getattr(fn, "_args", lambda p: None))
        return fn

    return deco


def args(setup):
    def deco(fn):
        fn._args = setup
        return fn

    return deco


def _progress() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


# ---------------------------------------------------------------- build
def _build_args(p):
    p.add_argument("--recipe", required=True, type=Path, help="recipe YAML")
    p.add_argument("--out", type=Path, help="output folder (default graphs/<recipe name>)")
    p.add_argument("--target", choices=["onnx", "tensorrt"], help="lowering target (default: the recipe's first)")
    p.add_argument("--bench", help="JSONL used for the build's parity check (default: the recipe's calibration data)")
    p.add_argument("--samples", type=int, default=8, help="parity samples checked during the build (default 8)")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def graph_sizes(man: dict) -> str:
    """'vision.onnx 1.20 MB, prefill.onnx 0.37 MB + 869.45 MB data, ...' (a graph over the
    external-data threshold keeps its tensors in <graph>.onnx.data)."""

    def size(v):
        data = man.get("files", {}).get(v.get("external_data") or "", {}).get("bytes")
        return f"{v['bytes'] / 1e6:.2f} MB" + (f" + {data / 1e6:.2f} MB data" if data else "")

    return ", ".join(f"{n} {size(v)}" for n, v in man["graphs"].items())


@command("build", "recipe + model -> verified ONNX graphs")
@args(_build_args)
def cmd_build(a) -> int:
    from quota_export.build import ParityError, build, next_steps
    from quota_export.recipe import load_recipe
    from quota_export.runtime.ort import read_manifest
    from quota_export.verify import summary_line

    if a.samples < 1:
        raise UserError(f"--samples: must be at least 1, got {a.samples}")
    recipe = load_recipe(a.recipe)
    target = a.target or recipe.export.targets[0]
    try:
        res = build(recipe, a.out, a.bench, a.samples, progress=_progress(), target=target, log=_say)
    except ParityError as e:  # the graphs are wrong, not the input: exit 1, as `verify` does
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    man = res.manifest
    if "sets" in man:  # one graph set per declared image size
        print(f"built {res.out}/ in {res.seconds:.1f} s: {len(man['sets'])} graph sets (one per image size)")
        for st in man["sets"]:
            h, w = st["image_size"]
            print(f"  {st['dir']}/ ({w}x{h}, {st['n_visual']} visual tokens): "
                  + summary_line(st["parity"], st["parity"].get("data")))
        sub = read_manifest(res.out / man["sets"][0]["dir"])
    else:
        print(f"built {res.out}/ in {res.seconds:.1f} s ({graph_sizes(man)})")
        print(summary_line(man["parity"], man["parity"].get("data")))
        sub = man
    for line in next_steps(res):
        print(line)
    eng = sub.get("engines")
    if eng is not None and eng.get("parity"):  # TensorRT engines, checked through TrtRunner
        print("engines: " + summary_line(eng["parity"], eng["parity"].get("data")))
    if eng is not None and not eng["built"]:
        # the TensorRT-ready graphs are written and checked on ONNX Runtime; engines are not
        print(f"error: no TensorRT engine built: {eng['reason']} (TensorRT-ready ONNX is in {res.out}/)", file=sys.stderr)
        return 3
    return 0


# ---------------------------------------------------------------- backends (runtime/runners.py)
def _backend_arg(p):
    p.add_argument("--backend", choices=["ort-cpu", "ort-cuda", "tensorrt"], default="ort-cpu",
                   help="ort-cpu (default), ort-cuda (onnxruntime-gpu), tensorrt (the build's engines); docs/gpu.md")


def _backend_refused(backend: str) -> bool:
    """Print why `backend` cannot run here (one line) and say so; the command then exits 3."""
    from quota_export.runtime.runners import backend_unavailable_reason

    reason = backend_unavailable_reason(backend)
    if reason:
        print(f"error: --backend {backend}: {reason}", file=sys.stderr)
    return reason is not None


# ---------------------------------------------------------------- verify
def _verify_args(p):
    p.add_argument("--artifacts", required=True, type=Path, help="a folder written by `build`")
    p.add_argument("--bench", required=True, help="benchmark JSONL")
    p.add_argument("--samples", type=int, default=50, help="samples compared (default 50)")
    p.add_argument("--json", type=Path, help="write the report as JSON")
    _backend_arg(p)


@command("verify", "parity of built graphs vs the PyTorch reference")
@args(_verify_args)
def cmd_verify(a) -> int:
    from quota_export.build import deployed_at, load_items, load_model
    from quota_export.recipe import load_recipe
    from quota_export.runtime.ort import graph_sets, read_manifest
    from quota_export.runtime.runners import GraphRunner, parity_session_bytes
    from quota_export.verify import compare, misses_line, parity_kind, summary_line, thresholds_for

    if a.samples < 1:
        raise UserError(f"--samples: must be at least 1, got {a.samples}")
    sets = graph_sets(a.artifacts)  # a bad folder is bad input (exit 2) before the backend (exit 3)
    if _backend_refused(a.backend):
        return 3
    several = len(sets) > 1
    keys = ("kept_index_agreement", "kept_index_agreement_per_stage", "answer_agreement", "logits_sqnr_db_min",
            "logits_sqnr_db_median", "samples", "failing_samples")
    reports, fails = {}, []
    base = None
    for (h, w), folder in sets:
        runner = GraphRunner(folder, a.backend, session_bytes=parity_session_bytes(read_manifest(folder)))
        recipe = load_recipe(folder / "recipe.yaml")
        if recipe.content_hash() != runner.manifest["recipe_hash"]:
            raise UserError(f"{folder / 'recipe.yaml'}: does not match the manifest's recipe hash (edited after the build?)")
        # a set built for another size than the benchmark's images sees them resized
        data = load_items(a.bench, a.samples, runner.image_size, resize=several, any_size=runner.resizes_images)
        where = str(folder)
        _say(f"comparing {where} ({a.backend}) with the PyTorch reference (fp64 reductions) of {recipe.model_path()} on {len(data.items)} samples")
        if not recipe.model_path().exists():  # the model is loaded once the graphs have run
            raise UserError(f"model: checkpoint folder not found: {recipe.model_path()}")
        reductions = runner.manifest.get("reductions", "fp64")

        def reference(recipe=recipe, size=(h, w)):
            nonlocal base
            if base is None:
                base = load_model(recipe)
                memtrace.mark("load")
            # the exact reference (fp64 reductions) for every build, as `build` checks it (verify.py)
            _, dep = deployed_at(recipe, base, size if recipe.export.image_sizes else None, fp64=True)
            memtrace.mark("quantize")
            return dep

        # the graphs first, their sessions released, then the reference (not both in memory)
        rep = compare(runner, reference, data.items, recipe.export.max_new_tokens, _progress(), ids=data.ids,
                      release=True)
        d = rep.as_dict()
        print(("  " if several else "") + summary_line(d, data.source))
        if d["failing_samples"]:
            print(("  " if several else "") + misses_line(d["failing_samples"]))
        if reductions == "fp32":
            print(("  " if several else "") + f"parity: {parity_kind(reductions)} (README, TensorRT)")
        reports[f"{w}x{h}"] = {k: d[k] for k in keys}
        fails += [f"{w}x{h}: {f}" if several else f for f in rep.failures(thresholds_for(reductions))]
    if a.json:
        out = {"backend": a.backend, **next(iter(reports.values()))}
        if several:  # the worst figures over the sets, and each set's own
            vals = list(reports.values())
            sq = [v["logits_sqnr_db_min"] for v in vals]
            out = {
                "kept_index_agreement": min(v["kept_index_agreement"] for v in vals),
                "answer_agreement": min(v["answer_agreement"] for v in vals),
                "logits_sqnr_db_min": None if None in sq else min((x for x in sq if x != "inf"), default="inf"),
                "samples": sum(v["samples"] for v in vals),
                "backend": a.backend,
                "sets": reports,
            }
        try:
            a.json.write_text(json.dumps(out, indent=1) + "\n")
        except OSError as e:
            raise UserError(f"{a.json}: cannot write the report ({e.strerror})") from None
    if fails:
        print("error: parity check failed: " + "; ".join(fails), file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- run
def _run_args(p):
    p.add_argument("--artifacts", required=True, type=Path, help="a folder written by `build`")
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, help="default: the recipe's export.max_new_tokens")
    _backend_arg(p)


@command("run", "answer a question about an image with built graphs")
@args(_run_args)
def cmd_run(a) -> int:
    from quota_export.data import load_image
    from quota_export.limits import check_max_new_tokens, check_text
    from quota_export.runtime.graphmajor import generate_all
    from quota_export.runtime.ort import graph_sets, read_manifest, set_for_image
    from quota_export.runtime.runners import GraphRunner, parity_session_bytes

    def runner_of(folder):  # sessions made on use, one graph at a time (graphmajor.py): one answer
        return GraphRunner(folder, a.backend, session_bytes=parity_session_bytes(read_manifest(folder)))

    if a.max_new_tokens is not None:
        check_max_new_tokens(a.max_new_tokens, "--max-new-tokens")
    check_text(a.prompt, "--prompt")
    several = len(graph_sets(a.artifacts)) > 1
    if _backend_refused(a.backend):
        return 3
    runner = None if several else runner_of(a.artifacts)
    if not a.image.is_file():
        raise UserError(f"{a.image}: image not found")
    img = load_image(a.image)
    if several:  # one graph set per declared image size: the image's size picks it
        runner = runner_of(set_for_image(a.artifacts, img.shape[:2]))
    h, w = runner.image_size
    if img.shape[:2] != (h, w) and not runner.resizes_images:
        raise UserError(f"{a.image}: image is {img.shape[1]}x{img.shape[0]}, these graphs take {w}x{h} (resize it first)")
    res = generate_all(runner, [(img, a.prompt)], a.max_new_tokens)[0]
    print(res.text)
    if not res.text:
        _say("note: the answer is empty (the model ended it at once)")
    return 0


def _load_optional():
    """Subcommands living in their own modules register themselves on import."""
    import importlib

    for mod in ("quota_export.cli_calibrate", "quota_export.cli_eval", "quota_export.cli_report",
                "quota_export.cli_serve"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    _load_optional()
    ap = argparse.ArgumentParser(prog="python -m quota_export", description="QUOTA exporter for VLMs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, (help_, fn, setup) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        setup(p)
        p.set_defaults(fn=fn)
    a = ap.parse_args(argv)
    from quota_export.failures import expected_failure, terminate_as_interrupt

    with terminate_as_interrupt():  # SIGTERM unwinds like Ctrl-C: a build removes its temporary folder
        try:
            return a.fn(a)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return getattr(e, "exit_code", 2)
        except (KeyboardInterrupt, Exception) as e:  # the expected kinds only (failures.py); a bug keeps its traceback
            known = expected_failure(e)
            if known is None:
                raise
            print(f"error: {known[0]}", file=sys.stderr)
            return known[1]


if __name__ == "__main__":
    sys.exit(main())
