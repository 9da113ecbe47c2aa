"""Primitive-level parity: each op's torch form against its ONNX form on ONNX Runtime (CPU)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from quota_export.ops.base import Emit
from quota_export.ops.graph import Graph
from quota_export.runtime.ort import SESSION_CONFIG

NP2ONNX = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float64): onnx.TensorProto.DOUBLE,
           np.dtype(np.int64): onnx.TensorProto.INT64, np.dtype(np.uint8): onnx.TensorProto.UINT8}


def onnx_run(build, feeds: dict[str, np.ndarray], fp64: bool = True, target: str = "onnx", opset: int = 21):
    """Emit `build(e, *input names)` -> [(tensor, onnx dtype), ...] into a graph with the feeds as
    inputs and run it on ONNX Runtime the way the runner does; -> list of numpy outputs."""
    e = Emit(Graph("op"), fp64, target)
    names = [e.g.input(k, NP2ONNX[v.dtype], list(v.shape)) for k, v in feeds.items()]
    outs = build(e, *names)
    for i, (t, dt) in enumerate(outs):
        e.g.nodes.append(helper.make_node("Identity", [t], [f"out{i}"], name=f"/out{i}"))
        e.g.outputs.append(helper.make_tensor_value_info(f"out{i}", dt, None))
    m = e.g.model(opset)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    for k, v in SESSION_CONFIG.items():
        so.add_session_config_entry(k, v)
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def randn(*shape, seed=0, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale
