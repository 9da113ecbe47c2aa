"""Target `onnx`: standard ONNX only (opset 21+), run by ONNX Runtime.

Stages: trace (vision tower via torch.onnx.export) -> decoder lowered op by op with INT4 Q/DQ
(lower/decoder.py) -> per-stage TopK gathers inside prefill -> finalize (check, save).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from onnx import version_converter

from quota_export import __version__, memtrace, weightcache
from quota_export.lower import external
from quota_export.lower.decoder import DecoderLowering, embed_graph
from quota_export.reference import Deployed


def vision_graph(adapter, opset: int) -> onnx.ModelProto:
    mod = adapter.vision_module().eval()
    x = torch.zeros(*adapter.pixel_shape())  # [1,3,H,W] (LLaVA), [patches, C*tp*p*p] (Qwen2-VL)
    # exported to a file: a tower over 2 GiB comes with external data beside it (a buffer cannot
    # hold it); the same bytes as an in-memory export otherwise
    with tempfile.TemporaryDirectory(prefix="quota-vision-") as d:
        path = Path(d) / "vision.onnx"
        # the TorchScript exporter tops out at opset 20; the graph is converted to `opset` below
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                mod,
                (x,),
                str(path),
                input_names=["pixel_values"],
                output_names=["image_features"],
                opset_version=min(opset, 20),
                dynamo=False,
                do_constant_folding=True,
            )
        m = read_exported(path, opset)
    m.producer_name, m.producer_version = "quota_export", __version__
    return m


def read_exported(path: Path, opset: int) -> onnx.ModelProto:
    """An exported graph converted to `opset`, its external data (if any) read into memory: the
    conversion sees the graph without the tensors' bytes (it serializes its input, < 2 GiB).
    Inside external.streaming, a large graph's bytes are copied to its data file instead."""
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_model

    m = onnx.load(str(path), load_external_data=False)
    if opset > 20:
        m = convert_light(m, opset)
    ext = [t for t in _get_all_tensors(m) if t.data_location == onnx.TensorProto.EXTERNAL]
    if ext and external.stream_exported(m, path.parent, path.stem):
        return m  # inside external.streaming: the bytes went from the exporter's files to <graph>.onnx.data
    if ext:
        load_external_data_for_model(m, str(path.parent))
        for t in ext:
            t.ClearField("data_location")  # as if it had never been external
    return m


_HELD = "quota_export:held"  # the external-data location of a tensor held aside during convert_light


def convert_light(m: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """version_converter.convert_version(m, opset) without the tensors' bytes: the converter
    serializes and parses its input and output (a 1.2 GB vision tower would be held five times
    over), so it converts a copy of `m` whose initializers refer to their bytes instead, and the
    converted graph takes `m`'s initializers back. The same graph as converting `m` itself."""
    skel = onnx.ModelProto()
    _copy_fields(m, skel, skip="graph")
    _copy_fields(m.graph, skel.graph, skip="initializer")
    for t in m.graph.initializer:
        light = skel.graph.initializer.add()
        _copy_fields(t, light, skip="raw_data")
        if t.HasField("raw_data"):
            external._point(light, _HELD, 0, len(t.raw_data))
    out = version_converter.convert_version(skel, opset)
    del skel
    held = {t.name: t for t in m.graph.initializer if t.HasField("raw_data")}
    for t in out.graph.initializer:
        if t.data_location == t.EXTERNAL and any(e.key == "location" and e.value == _HELD for e in t.external_data):
            t.CopyFrom(held[t.name])
    return out


def _copy_fields(src, dst, skip: str) -> None:
    """Every set field of protobuf message `src` but `skip` into `dst` (of the same type)."""
    for f, v in src.ListFields():
        if f.name == skip:
            continue
        if f.is_repeated:
            getattr(dst, f.name).extend(v)
        elif f.message_type is not None:
            getattr(dst, f.name).CopyFrom(v)
        else:
            setattr(dst, f.name, v)


def makers(dep: Deployed | Callable[[], Deployed], visual_start: int, opset: int, adapter=None) -> dict:
    """graph file name -> a function making that graph (in the order they are written). `dep` may
    be a function making the Deployed of `adapter` (quantizing it): called by the decoder graphs
    only, after the vision tower's export."""
    made = dep if callable(dep) else (lambda: dep)
    adapter = adapter if adapter is not None else dep.adapter
    n = adapter.n_visual()
    return {
        "vision.onnx": lambda: vision_graph(adapter, opset),
        "embed.onnx": lambda: embed_graph(adapter.embed_tokens().weight.detach().float().numpy(), opset),
        "prefill.onnx": lambda: DecoderLowering(made(), n, visual_start).prefill(opset),
        "decode.onnx": lambda: DecoderLowering(made(), n, visual_start).decode(opset),
    }


def lower(dep: Deployed, visual_start: int, opset: int) -> dict[str, onnx.ModelProto]:
    graphs = {name: make() for name, make in makers(dep, visual_start, opset).items()}
    for m in graphs.values():
        external.check(m)  # a graph over the external-data threshold is checked by path once written
    return graphs


def lower_into(folder: Path, dep: Deployed | Callable[[], Deployed], visual_start: int, opset: int,
               adapter=None) -> dict[str, tuple[dict, onnx.ModelProto]]:
    """The four graphs written into `folder` one at a time, each as soon as it is made, its
    initializers streamed to its data file while it is built (external.streaming): the process
    never holds more than one graph, and a large one without its weights. -> name -> (file
    entry of external.write_graph, the graph without its initializers: its inputs and outputs).
    The same files as writing `lower()`'s graphs. `dep` may be a function making the Deployed
    of `adapter` (`build`: the vision tower is exported before the decoder is quantized)."""
    out = {}
    with external.streaming(folder):
        for name, make in makers(dep, visual_start, opset, adapter).items():
            m = make()
            external.check(m)
            entry = external.write_graph(m, Path(folder) / name)
            m.graph.ClearField("initializer")  # what the caller reads (inputs, outputs) stays
            out[name] = (entry, onnx.ModelProto.FromString(m.SerializeToString()))
            del m  # a copy is kept: a cleared field's bytes stay in the message's arena (upb) until it goes
            weightcache.trim()
            memtrace.mark(f"lower {name}")
    return out
