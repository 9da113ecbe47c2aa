"""`python -m quota_export export-triton`: a model repository for a full `tritonserver`.

    <out>/
      quota_vlm/            backend "python": the entry model (BLS). model.py = bls_model.py;
        config.pbtxt          1/build/ holds manifest.json, recipe.yaml and processor/ of the build
        1/model.py, 1/build/
      quota_vlm_vision/     backend "onnxruntime" (platform "tensorrt_plan" where the build has an
      quota_vlm_embed/        engine for the graph): 1/model.onnx (or 1/model.plan)
      quota_vlm_prefill/
      quota_vlm_decode/

Every config.pbtxt is generated from the manifest's tensor names, types and shapes (symbolic
dims -> -1). max_batch_size is 0: the graphs take batch 1 (explicit leading 1 in the dims);
concurrency comes from instance_group counts.

ONNX Runtime backend note: it applies only a fixed list of session settings, not
`session.qdq_matmulnbits_accuracy_level` (runtime/ort.py SESSION_CONFIG). With its default
graph optimization (all levels) ORT fuses the INT4 DequantizeLinear + MatMul into MatMulNBits with
accuracy level 4, which re-quantizes activations to int8: measured on the default build, 1 answer in
20 of the test split changes and prefill logits move by up to 4.4. The configs therefore set
`optimization { graph { level: -1 } }` (basic optimizations: no such fusion); answers then equal
`run`'s (logits within 1e-5).

tensorrt_plan: written only for graphs the build has engines for and which hold no
quota::TokenGather node (the plugin is a Python TensorRT plugin that tritonserver's TensorRT
backend cannot load; such a graph goes to the ONNX Runtime backend with the gathers inlined, as
`run` does). Engines need a GPU: never exercised here (no GPU, no TensorRT).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from quota_export import UserError
from quota_export.serve.protocol import INPUTS, MODEL_NAME, OUTPUTS

ORT_GRAPH_LEVEL = -1  # ONNX Runtime backend: basic graph optimizations only (see the module note)

# manifest dtype names (onnx.helper.tensor_dtype_to_np_dtype names) -> Triton config types
TRITON_TYPES = {"float": "TYPE_FP32", "float32": "TYPE_FP32", "float16": "TYPE_FP16", "double": "TYPE_FP64",
                "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                "bool": "TYPE_BOOL"}


@dataclass
class Repository:
    root: Path
    models: list[str]


def component(graph: str, name: str = MODEL_NAME) -> str:
    """Model name of a graph in the repository: prefill.onnx -> quota_vlm_prefill."""
    return f"{name}_{graph.removesuffix('.onnx')}"


def _dims(shape) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) and d >= 0 else "-1" for d in shape) + " ]"


def _tensors(kind: str, tensors) -> str:
    """(name, Triton type, dims, optional) -> an input / output block of config.pbtxt."""
    rows = []
    for name, ttype, shape, optional in tensors:
        opt = " optional: true" if optional else ""
        rows.append(f'  {{ name: "{name}" data_type: {ttype} dims: {_dims(shape)}{opt} }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def _triton_type(where: str, dtype: str) -> str:
    if dtype not in TRITON_TYPES:
        raise UserError(f"{where}: tensor type {dtype!r} has no Triton equivalent")
    return TRITON_TYPES[dtype]


def graph_config(model: str, graph: str, info: dict, platform: str, instances: int) -> str:
    """config.pbtxt of one graph's model, from the manifest's entry for it."""
    ins = [(t["name"], _triton_type(f"{graph} input {t['name']}", t["dtype"]), t["shape"], False) for t in info["inputs"]]
    outs = [(t["name"], _triton_type(f"{graph} output {t['name']}", t["dtype"]), t["shape"], False) for t in info["outputs"]]
    if platform == "onnxruntime":
        head = f'name: "{model}"\nbackend: "onnxruntime"\ndefault_model_filename: "model.onnx"\n'
        kind, tail = "KIND_CPU", f"optimization {{ graph {{ level: {ORT_GRAPH_LEVEL} }} }}\n"
    else:  # tensorrt_plan: needs a GPU (not exercised here)
        head = f'name: "{model}"\nplatform: "tensorrt_plan"\ndefault_model_filename: "model.plan"\n'
        kind, tail = "KIND_GPU", ""
    return (head + "max_batch_size: 0\n" + _tensors("input", ins) + _tensors("output", outs)
            + f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n" + tail)


def entry_config(model: str, instances: int) -> str:
    """config.pbtxt of the BLS entry model (protocol.py's interface)."""
    ins = [(n, t, s, o) for n, _, t, s, o in INPUTS]
    outs = [(n, t, s, o) for n, _, t, s, o in OUTPUTS]
    return (f'name: "{model}"\nbackend: "python"\nmax_batch_size: 0\n' + _tensors("input", ins) + _tensors("output", outs)
            + f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n")


def _has_plugin_nodes(path: Path) -> bool:
    import onnx

    return any(n.domain not in ("", "ai.onnx") for n in onnx.load(str(path), load_external_data=False).graph.node)


def export_repository(artifacts: Path, out: Path, instances: int = 1, name: str = MODEL_NAME) -> Repository:
    """Write the repository into a temporary sibling of `out`, then move it into place."""
    from quota_export.runtime.ort import GRAPHS, _sha256, read_manifest

    artifacts, out = Path(artifacts), Path(out)
    if instances < 1:
        raise UserError(f"--instances: must be at least 1, got {instances}")
    man = read_manifest(artifacts)  # one graph set: a multi-size build names its sets
    if out.exists():
        raise UserError(f"{out}: already exists (export-triton writes a new folder)")
    for g in GRAPHS:
        p = artifacts / g
        if not p.is_file():
            raise UserError(f"{p}: graph missing (rebuild with `python -m quota_export build`)")
        if _sha256(p) != man["graphs"][g]["sha256"]:
            raise UserError(f"{p}: corrupt graph (checksum differs from the manifest; modified after the build?)")
    for part in ("processor", "recipe.yaml"):
        if not (artifacts / part).exists():
            raise UserError(f"{artifacts / part}: missing (the build folder is incomplete)")
    engines = man.get("engines") or {}
    engine_files = set(engines.get("files", [])) if engines.get("built") else set()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    models = []
    try:
        for g in GRAPHS:
            model = component(g, name)
            ver = tmp / model / "1"
            ver.mkdir(parents=True)
            src = artifacts / g
            engine = g.replace(".onnx", ".engine")
            plugin = man.get("target") == "tensorrt" and _has_plugin_nodes(src)
            if engine in engine_files and not plugin:
                shutil.copyfile(artifacts / engine, ver / "model.plan")
                platform = "tensorrt_plan"
            elif plugin:  # ONNX Runtime has no quota::TokenGather: the same gather in standard ops
                import onnx

                from quota_export.lower.tensorrt_target import inline_token_gathers

                onnx.save(inline_token_gathers(onnx.load(str(src))), str(ver / "model.onnx"))
                platform = "onnxruntime"
            else:
                shutil.copyfile(src, ver / "model.onnx")
                platform = "onnxruntime"
            (tmp / model / "config.pbtxt").write_text(graph_config(model, g, man["graphs"][g], platform, instances))
            models.append(f"{model} ({platform})")
        ver = tmp / name / "1"
        (ver / "build").mkdir(parents=True)
        shutil.copyfile(Path(__file__).with_name("bls_model.py"), ver / "model.py")
        shutil.copyfile(artifacts / "manifest.json", ver / "build" / "manifest.json")
        shutil.copyfile(artifacts / "recipe.yaml", ver / "build" / "recipe.yaml")
        shutil.copytree(artifacts / "processor", ver / "build" / "processor")
        (tmp / name / "config.pbtxt").write_text(entry_config(name, instances))
        models.insert(0, f"{name} (python, BLS)")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return Repository(out, models)
