"""Target `tensorrt`: the same recipe lowered to what TensorRT accepts.

- INT4 weights: blocked DequantizeLinear on constants (TensorRT's weight-only INT4; block 64/128);
- 4-bit activations: no INT4 activation Q/DQ (TensorRT has none); the per-token scale is computed
  in the graph and Round + Clip + Mul in float reproduce the Q/DQ pair exactly;
- gathers: `quota::TokenGather` nodes (plugins/quotaTokenGather), k/start/n_visual attributes;
- every graph passes lower/trt_check.py (TensorRT's documented operator rules) before it is saved.

ONNX Runtime cannot run the plugin, so `inline_token_gathers` swaps each plugin node for the
standard-op gather (ops/gather.py) with the same inputs and outputs: that is how these
graphs' numerics are checked against reference.py on a machine without a GPU.

Engines (`build_engines`) need `tensorrt` and an NVIDIA GPU; neither exists on the development
machines, so that function has never run there (see README, "TensorRT").
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from quota_export.lower.decoder import DecoderLowering, embed_graph
from quota_export.ops.gather import PLUGIN_DOMAIN, PLUGIN_OP, build_gather_subgraph
from quota_export.lower.onnx_target import vision_graph
from quota_export.lower.trt_check import check_model
from quota_export.reference import Deployed


def lower(dep: Deployed, visual_start: int, opset: int) -> dict[str, onnx.ModelProto]:
    """The four graphs for TensorRT. TensorRT has no FP64: they are lowered from `dep` with fp32
    reductions (`Deployed.with_reductions`); `dep` itself is left as it is."""
    adapter = dep.adapter
    dep = dep.with_reductions(False)
    n = adapter.n_visual()
    graphs = {
        "vision.onnx": vision_graph(adapter, opset),
        "embed.onnx": embed_graph(adapter.embed_tokens().weight.detach().float().numpy(), opset),
        "prefill.onnx": DecoderLowering(dep, n, visual_start, target="tensorrt").prefill(opset),
        "decode.onnx": DecoderLowering(dep, n, visual_start, target="tensorrt").decode(opset),
    }
    for m in graphs.values():
        onnx.checker.check_model(m)
    return graphs


def violations(graphs: dict[str, onnx.ModelProto]) -> list[str]:
    """TensorRT rule violations of every graph, each as `graph: node (op): [rule] message`."""
    return [f"{name}: {v}" for name, m in graphs.items() for v in check_model(m)]


def inline_token_gathers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every quota::TokenGather node replaced by the standard-op gather."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    # every stage gathers position ids of the graph input's rank: [B,T], or M-RoPE planes [3,B,T]
    pos = [i for i in m.graph.input if i.name == "position_ids"]
    rank = len(pos[0].type.tensor_type.shape.dim) if pos else 2
    nodes = []
    for node in m.graph.node:
        if node.domain == PLUGIN_DOMAIN and node.op_type == PLUGIN_OP:
            at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            prefix = node.name.rsplit("/", 1)[0] + "/inlined"
            sub = build_gather_subgraph(prefix, *node.input, k=at["k"], start=at["start"], n_visual=at["n_visual"],
                                        position_ids_rank=rank)
            nodes.extend(sub.nodes)
            for src, dst in zip((sub.hidden, sub.position_ids, sub.kept), node.output):
                nodes.append(helper.make_node("Identity", [src], [dst], name=f"{prefix}/{dst.rsplit('/', 1)[-1]}"))
        else:
            nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    keep = [o for o in m.opset_import if o.domain != PLUGIN_DOMAIN]
    del m.opset_import[:]
    m.opset_import.extend(keep)
    return m


def engine_unavailable_reason() -> str | None:
    """None when engines can be built here, else the one-line reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (the tensorrt Python package does not import)"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no NVIDIA GPU is visible (torch.cuda.is_available() is False)"
    except ImportError:
        return "torch is not installed"
    return None


def build_engines(folder: Path, names=("vision.onnx", "embed.onnx", "prefill.onnx", "decode.onnx")) -> list[Path]:
    """Strongly typed TensorRT engines from the TensorRT-ready graphs in `folder` (needs a GPU).

    UNVERIFIED: written against the TensorRT 10.9+ Python API; never run on the development
    machines (no TensorRT, no GPU). Dynamic `seq` / past lengths get one optimization profile
    from 1 to the manifest's max_seq.
    """
    import json

    import tensorrt as trt

    from plugins.quotaTokenGather.plugin import register

    register()
    man = json.loads((folder / "manifest.json").read_text())
    max_seq = man["export"].get("max_seq", 256)
    logger = trt.Logger(trt.Logger.WARNING)
    out = []
    for name in names:
        builder = trt.Builder(logger)
        net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(net, logger)
        if not parser.parse_from_file(str(folder / name)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"{name}: TensorRT could not parse the graph: {errs}")
        config = builder.create_builder_config()
        # TF32 is on by default and rounds fp32 MatMul inputs to a 10-bit mantissa: the exact
        # integer-activation matmuls (quant.weights.accumulation: exact) need true fp32 products
        config.clear_flag(trt.BuilderFlag.TF32)
        profile = builder.create_optimization_profile()
        for i in range(net.num_inputs):
            t = net.get_input(i)
            shape = list(t.shape)
            lo = [1 if d < 0 else d for d in shape]
            hi = [max_seq if d < 0 else d for d in shape]
            opt = [max(1, h // 2) if d < 0 else d for d, h in zip(shape, hi)]
            profile.set_shape(t.name, lo, opt, hi)
        config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(net, config)
        if blob is None:
            raise RuntimeError(f"{name}: TensorRT engine build failed")
        path = folder / name.replace(".onnx", ".engine")
        path.write_bytes(bytes(blob))
        out.append(path)
    return out
