"""Target `onnx`: standard ONNX only (opset 21+), run by ONNX Runtime.

Stages: trace (vision tower via torch.onnx.export) -> decoder lowered op by op with INT4 Q/DQ
(lower/decoder.py) -> per-stage TopK gathers inside prefill -> finalize (check, save).
"""

from __future__ import annotations

import io
import warnings

import onnx
from quota_export import __version__
from onnx import version_converter
import torch

from quota_export.lower.decoder import DecoderLowering, embed_graph
from quota_export.reference import Deployed


def vision_graph(adapter, opset: int) -> onnx.ModelProto:
    mod = adapter.vision_module().eval()
    x = torch.zeros(*adapter.pixel_shape())  # [1,3,H,W] (LLaVA), [patches, C*tp*p*p] (Qwen2-VL)
    buf = io.BytesIO()
    # the TorchScript exporter tops out at opset 20; the graph is converted to `opset` below
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            mod,
            (x,),
            buf,
            input_names=["pixel_values"],
            output_names=["image_features"],
            opset_version=min(opset, 20),
            dynamo=False,
            do_constant_folding=True,
        )
    m = onnx.load_from_string(buf.getvalue())
    if opset > 20:
        m = version_converter.convert_version(m, opset)
    m.producer_name, m.producer_version = "quota_export", __version__
    return m


def lower(dep: Deployed, visual_start: int, opset: int) -> dict[str, onnx.ModelProto]:
    adapter = dep.adapter
    low = DecoderLowering(dep, adapter.n_visual(), visual_start)
    graphs = {
        "vision.onnx": vision_graph(adapter, opset),
        "embed.onnx": embed_graph(adapter.embed_tokens().weight.detach().float().numpy(), opset),
        "prefill.onnx": low.prefill(opset),
        "decode.onnx": DecoderLowering(dep, adapter.n_visual(), visual_start).decode(opset),
    }
    for m in graphs.values():
        onnx.checker.check_model(m)
    return graphs
