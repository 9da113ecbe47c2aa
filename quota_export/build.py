"""`build`: recipe + model -> graphs/<name>/ (vision, embed, prefill, decode, manifest), verified.

Everything is written to a temporary sibling folder and moved into place only after the
graphs load in ONNX Runtime and the parity check against reference.py holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

from quota_export import UserError, __version__

PARITY_SAMPLES = 8


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "quota_export": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def load_deployed(recipe):
    """Recipe -> (adapter, Deployed) with the recipe checked against the model."""
    from quota_export import models
    from quota_export.reference import DeployConfig, Deployed

    adapter = models.load(recipe.model_path() if callable(getattr(recipe, "model_path", None)) else recipe.model)
    spec = adapter.decoder_spec()
    recipe.check_against(spec.num_layers, adapter.n_visual(), adapter.module_names())
    cfg = DeployConfig.from_recipe(recipe)
    qweights = None
    if cfg.w_algorithm == "gptq":
        raise UserError("quant.weights.algorithm: gptq weights are not stored with recipes yet; use rtn")
    return adapter, Deployed(adapter, cfg, qweights)


def parity_items(adapter, recipe, n: int, bench: str | None = None):
    """(image, question) pairs: from a benchmark JSONL if given (or the recipe's calibration data),
    else seeded random images with a fixed question."""
    from quota_export.data import load_bench, load_image

    src = bench or (recipe.calibration.data if recipe.calibration else None)
    if src and Path(src).is_file():
        samples = load_bench(src, limit=n)
        return [(load_image(s), s.question) for s in samples]
    h, w = adapter.image_size()
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "describe image") for _ in range(n)]


def io_spec(model) -> dict:
    from onnx import TensorProto

    def vi(v):
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": TensorProto.DataType.Name(t.elem_type).lower(), "shape": dims}

    return {"inputs": [vi(v) for v in model.graph.input], "outputs": [vi(v) for v in model.graph.output]}


def build(recipe, out: Path | None = None, bench: str | None = None, samples: int = PARITY_SAMPLES,
          progress: bool = True, target: str = "onnx") -> tuple[Path, dict]:
    import onnx
    from tqdm import tqdm

    from quota_export.lower import onnx_target
    from quota_export.runtime.ort import OrtRunner
    from quota_export.verify import compare

    out = Path(out) if out else Path("graphs") / recipe.name
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output path exists and is a file")
    steps = tqdm(total=5, desc="build", disable=not progress, unit="step")
    steps.set_postfix_str("load model")
    adapter, dep = load_deployed(recipe)
    steps.update()
    probe = adapter.prompt(np.zeros((*adapter.image_size(), 3), np.uint8), "describe image")
    steps.set_postfix_str("lower")
    graphs = onnx_target.lower(dep, probe.visual_start, recipe.export.opset)
    steps.update()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out.parent}: cannot create output folder ({e.strerror})") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        steps.set_postfix_str("save")
        files = {}
        for name, m in graphs.items():
            data = m.SerializeToString(deterministic=True)
            if len(data) > 2_000_000_000:
                onnx.save_model(m, tmp / name, save_as_external_data=True, location=name + ".data")
            else:
                (tmp / name).write_bytes(data)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": hashlib.sha256((tmp / name).read_bytes()).hexdigest()}
        adapter.processor.save_pretrained(tmp / "processor")
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        spec = dep.spec
        manifest = {
            "recipe": recipe.name,
            "recipe_hash": recipe.content_hash(),
            "target": target,
            "model": {
                "path": str(recipe.model),
                "architecture": adapter.architecture,
                "visual_start": probe.visual_start,
                "n_visual": probe.n_visual,
                "image_size": list(adapter.image_size()),
                "eos_token_id": spec.eos_token_id,
                "image_token_id": int(adapter.model.config.image_token_index),
                "num_layers": spec.num_layers,
            },
            "schedule": [{"layer": s.layer, "keep": s.keep} for s in dep.cfg.stages],
            "kept_per_layer": recipe.kept_per_layer(spec.num_layers),
            "kv_cache": {"bits": dep.cfg.kv_bits, "group_size": dep.cfg.kv_group or spec.head_dim},
            "export": {"opset": recipe.export.opset, "max_new_tokens": recipe.export.max_new_tokens},
            "graphs": {n: {**files[n], **io_spec(m)} for n, m in graphs.items()},
            "versions": versions(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        steps.update()
        steps.set_postfix_str("parity")
        runner = OrtRunner(tmp)
        items = parity_items(adapter, recipe, samples, bench)
        rep = compare(runner, dep, items, recipe.export.max_new_tokens, progress=progress)
        steps.update()
        parity = rep.as_dict()
        manifest["parity"] = {k: v for k, v in parity.items() if k != "logits_sqnr_db"}
        manifest["parity"]["logits_sqnr_db"] = parity["logits_sqnr_db"]
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        fails = rep.failures()
        if fails:
            raise UserError(f"parity check failed ({'; '.join(fails)}); nothing written to {out}")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        steps.update()
        steps.close()
        return out, manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
