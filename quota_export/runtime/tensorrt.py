"""TensorRT engines through polygraphy: build (`build --target tensorrt`) and run (`--backend tensorrt`).

    engine_loader:  EngineFromNetwork(NetworkFromOnnxPath(graph, strongly_typed=True),
                                      config=CreateConfig(tf32=False, profiles=[one profile]))
    build_engines:  the `quota::TokenGather` plugin module registered first, then one `.engine` per
                    graph beside it, sizes and sha256 for the manifest
    engine_runner:  TrtRunner over a built engine, checked against the manifest first

Strongly typed: every tensor keeps the graph's dtype (no precision the graph did not ask for). TF32
off: fp32 MatMul inputs would otherwise be rounded to a 10-bit mantissa, and the exact integer-
activation matmuls (quant.weights.accumulation: exact) need true fp32 products. One optimization
profile per graph: dynamic `seq` / `past_len_*` from the shortest possible prompt (prefill: the text
before the image, the image, one token after) to the manifest's export.max_seq.

UNVERIFIED: needs TensorRT (>= 10.9, with tensorrt.plugin) and an NVIDIA GPU; neither exists on the
development machines, so nothing here has built or run an engine there (docs/gpu.md). What is
checked on CPU: the polygraphy loader chain is built as described (tests/runtime/test_runners.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from quota_export import UserError

ENGINE_SUFFIX = ".engine"


def engine_name(graph: str) -> str:
    return graph.replace(".onnx", ENGINE_SUFFIX)


def register_plugin() -> None:
    """Register `quota::TokenGather` (a Python QDP plugin: importing and registering its module is
    how TensorRT's ONNX parser and runtime find it; `--plugins` would load .so files only)."""
    from plugins.quotaTokenGather.plugin import register

    register()


def profile_for(inputs: list[dict], min_seq: int, max_seq: int):
    """A polygraphy Profile for graph inputs as the manifest records them (`io_spec`): integer dims
    fixed, `seq` from min_seq, other named dims (past lengths) from 1, all up to max_seq."""
    from polygraphy.backend.trt import Profile

    prof = Profile()
    for inp in inputs:
        lo, opt, hi = [], [], []
        for d in inp["shape"]:
            if isinstance(d, int):
                lo.append(d), opt.append(d), hi.append(d)
                continue
            a = min_seq if d == "seq" else 1
            lo.append(a), opt.append((a + max_seq) // 2), hi.append(max_seq)
        prof.add(inp["name"], lo, opt, hi)
    return prof


def engine_loader(onnx_path: Path, inputs: list[dict], min_seq: int, max_seq: int):
    """The lazy polygraphy loader of one engine (nothing runs until it is called)."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath

    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    return EngineFromNetwork(network, config=CreateConfig(tf32=False, profiles=[profile_for(inputs, min_seq, max_seq)]))


def _digest(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def build_engines(folder: Path, manifest: dict, say=lambda _m: None) -> dict[str, dict]:
    """One engine per graph of `manifest["graphs"]`, written beside it; -> {engine file: {bytes, sha256}}.
    UNVERIFIED (no TensorRT / GPU on the development machines)."""
    from polygraphy.backend.trt import SaveEngine

    from quota_export.runtime.runners import quiet_polygraphy

    quiet_polygraphy(warnings=True)
    register_plugin()  # before any parse: the prefill graph holds quota::TokenGather nodes
    max_seq = int(manifest["export"].get("max_seq") or 256)
    m = manifest["model"]
    prefill_min = m["visual_start"] + m["n_visual"] + 1
    files = {}
    for g, info in manifest["graphs"].items():
        path = folder / engine_name(g)
        say(f"      building {path.name} (strongly typed, TF32 off)")
        loader = engine_loader(folder / g, info["inputs"], prefill_min if g == "prefill.onnx" else 1, max_seq)
        SaveEngine(loader, str(path))()
        files[path.name] = _digest(path.read_bytes())
    return files


def engine_runner(folder: Path, graph: str, manifest: dict):
    """polygraphy TrtRunner over `<graph>.engine`, the file checked against the manifest's `engines`."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    path = folder / engine_name(graph)
    eng = manifest.get("engines") or {}
    rec = (eng.get("files") or {}) if isinstance(eng.get("files"), dict) else {}
    if not eng.get("built") or path.name not in rec:
        raise UserError(f"{folder}: no TensorRT engines recorded in manifest.json (build them with "
                        "`build --target tensorrt` on a machine with TensorRT and an NVIDIA GPU)")
    if not path.is_file():
        raise UserError(f"{path}: engine missing (rebuild with `build --target tensorrt`)")
    if _digest(path.read_bytes()) != rec[path.name]:
        raise UserError(f"{path}: corrupt engine (size or checksum differs from the manifest)")
    register_plugin()  # the engine's TokenGather layers name the plugin
    return TrtRunner(EngineFromBytes(BytesFromPath(str(path))), name=f"tensorrt:{graph}")
