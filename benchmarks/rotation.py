"""Per-channel 4-bit weights with and without the Hadamard rotation, vs today's grouped weights.

    python benchmarks/rotation.py [--model models/shapes-llava] [--bench calib_data/shapes/test.jsonl]
        [--samples 600] [--recipe recipes/default.yaml] [--calib calib_data/shapes/calib.jsonl]
        [--calib-samples 128] [--threads 1] [--out benchmarks/rotation.md]

Weight variants (all W4A4KV4, exact accumulation, activations per token, KV cache 4-bit):
  group-64 RTN            today's default (`recipes/default.yaml`'s quant)
  channel RTN             per-output-channel symmetric 4-bit weights, no rotation
  group-64 + rotation     the default's weights on the rotated model
  channel + rotation RTN  the `w4a4kv4-rot` preset
  channel + rotation GPTQ the preset with GPTQ weights (`calibrate --weights gptq`'s algorithm:
                          unpruned: on full streams; QUOTA: on the schedule's pruned streams)
each unpruned and under the QUOTA schedule of `--recipe` (its stages, keeps, score weights and
merging as written: searched for group-64 RTN, not re-searched per variant). Every row: retention
(mean over tasks of accuracy / FP accuracy), agreement with the FP answer, KL(P_fp || P) of the
first answer token, on one task-balanced slice of the bench. The GPTQ variant's recipes (with their
weights files) go to <out stem>_recipes/ (git-ignored), e.g. for benchmarks/paired.py.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = (  # (label, weights granularity, rotation, gptq)
    ("group-64 RTN (today's default)", "group", "none", False),
    ("channel RTN", "channel", "none", False),
    ("group-64 + rotation RTN", "group", "hadamard", False),
    ("channel + rotation RTN (w4a4kv4-rot)", "channel", "hadamard", False),
    ("channel + rotation GPTQ (w4a4kv4-rot + gptq)", "channel", "hadamard", True),
)


def variant_recipe(base, granularity: str, rotation: str, pruned: bool, name: str):
    """`base` (the default recipe) with the variant's weights and rotation, pruned as written or not."""
    from quota_export.recipe import Pruning, Quant

    rq = base.resolved_quant()
    w = rq.weights.model_copy(update={"granularity": granularity, "algorithm": "rtn", "calibrated": None})
    act = rq.activations.model_copy(update={"rotation": rotation})
    pruning = base.pruning if pruned else Pruning(budget=1.0, n_visual=base.pruning.n_visual, stages=[],
                                                 merge=base.pruning.merge)
    return base.model_copy(update={"name": name, "quant": Quant(weights=w, activations=act, kv_cache=rq.kv_cache),
                                   "pruning": pruning, "calibration": None}, deep=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/shapes-llava")
    ap.add_argument("--bench", default="calib_data/shapes/test.jsonl")
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "default.yaml")
    ap.add_argument("--calib", default="calib_data/shapes/calib.jsonl")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "rotation.md")
    a = ap.parse_args(argv)

    import torch

    from quota_export import versions
    from quota_export.calibrate import select_samples
    from quota_export.data import load_image
    from quota_export.evaluate import Harness
    from quota_export.gptq_calibrate import gptq_weights
    from quota_export.qweights import save_with_recipe, weight_meta
    from quota_export.recipe import load_recipe
    from quota_export.reference import DeployConfig, Deployed

    torch.set_num_threads(a.threads)
    base = load_recipe(a.recipe).model_copy(update={"model": a.model})
    h = Harness(a.model, a.bench, a.samples)
    rec_dir = a.out.with_name(a.out.stem + "_recipes")
    rec_dir.mkdir(parents=True, exist_ok=True)
    calib = [h.adapter.prompt(load_image(s), s.question) for s in select_samples(a.calib, a.calib_samples, a.seed)]
    t0 = time.perf_counter()
    print("fp reference ...", file=sys.stderr, flush=True)
    h.fp_reference()
    rows = []
    for pruned in (False, True):
        for label, gran, rot, gptq in VARIANTS:
            tag = f"{'quota' if pruned else 'full'}-{gran}-{rot}-{'gptq' if gptq else 'rtn'}"
            print(f"{tag} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            r = variant_recipe(base, gran, rot, pruned, f"rotation-{tag}")
            cfg = DeployConfig.from_recipe(r)
            qweights = None
            extra = ""
            if gptq:
                wq = r.resolved_quant().weights.model_copy(update={"algorithm": "gptq"})
                torch.set_num_threads(1)  # as calibrate: the same weights on any machine
                g = gptq_weights(h.adapter, cfg, wq, calib)
                torch.set_num_threads(a.threads)
                qweights = g.qweights
                extra = f"; GPTQ/RTN layer output error {g.error_ratio():.4f}"
                q = r.quant.model_copy(update={"weights": wq}, deep=True)
                meta = weight_meta(wq, cfg.a_bits, h.adapter, sorted(qweights), r.quant.activations.rotation,
                                   calibrated_on={"data": a.calib, "samples": len(calib), "seed": a.seed,
                                                  "schedule": [[s.layer, s.keep] for s in r.pruning.stages]})
                save_with_recipe(r.model_copy(update={"quant": q}), qweights, meta, rec_dir / f"rotation-{tag}.yaml")
            m = h.score(h._generate(Deployed(h.adapter, cfg, qweights), h.prompts(False), desc=tag))
            rows.append((pruned, label, m, time.perf_counter() - t, extra))
            _write(a, base, h, rows, time.perf_counter() - t0, versions())
    return 0


def _write(a, base, h, rows, total, vers):
    stages = ", ".join(f"L{s.layer}:{s.keep}" for s in base.pruning.stages)
    lines = [
        "# Per-channel 4-bit weights and the Hadamard rotation (shapes model)", "",
        f"`python benchmarks/rotation.py --samples {a.samples}` (script docstring: the variants). Model `{a.model}`, "
        f"bench `{a.bench}` ({len(h.samples)} task-balanced samples), QUOTA schedule of `{a.recipe.name}` "
        f"({stages}, merge {base.pruning.merge}; searched for group-64 RTN), GPTQ on {a.calib_samples} samples of "
        f"`{a.calib}` (seed {a.seed}).",
        f"Versions: {', '.join(f'{k} {v}' for k, v in vers.items())}; python {platform.python_version()}; "
        f"{a.threads} thread(s).", "",
        "Retention = mean over tasks of accuracy / FP accuracy; agreement = same greedy answer as FP; KL = mean "
        "KL(P_fp || P) of the first answer token (nats). All rows W4A4KV4 (4-bit per-token activations, 4-bit KV "
        "cache), exact accumulation.", "",
        "| pruning | weights | kept | overall | retention | agreement | KL | s | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pruned, label, m, s, extra in rows:
        lines.append(f"| {'QUOTA ' + stages if pruned else 'none'} | {label} | {m['mean_kept']:.3f} | "
                     f"{m['overall']:.3f} | {m['retention']:.3f} | {m['agreement']:.3f} | {m['kl']:.4g} | {s:.0f} | "
                     f"{extra.lstrip('; ')} |")
    lines += ["", f"Total {total:.0f} s."]
    a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
