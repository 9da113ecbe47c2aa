"""Target `tensorrt`: the same recipe lowered to what TensorRT accepts.

- INT4 weights: blocked DequantizeLinear on constants (TensorRT's weight-only INT4; block 64/128);
- 4-bit activations: no INT4 activation Q/DQ (TensorRT has none); the per-token scale is computed
  in the graph and Round + Clip + Mul in float reproduce the Q/DQ pair exactly;
- gathers: `quota::TokenGather` nodes (plugins/quotaTokenGather), k/start/n_visual attributes;
- every graph passes lower/trt_check.py (TensorRT's documented operator rules) before it is saved.

ONNX Runtime cannot run the plugin, so `inline_token_gathers` swaps each plugin node for the
standard-op gather (ops/gather.py) with the same inputs and outputs: that is how these
graphs' numerics are checked against reference.py on a machine without a GPU.

Engines (runtime/tensorrt.py, through polygraphy) need `tensorrt` and an NVIDIA GPU; neither exists
on the development machines, so they have never been built there (docs/gpu.md).
"""

from __future__ import annotations

import onnx
from onnx import helper

from quota_export.lower import external
from quota_export.lower.decoder import DecoderLowering, embed_graph
from quota_export.lower.onnx_target import vision_graph
from quota_export.lower.trt_check import check_model
from quota_export.ops.gather import PLUGIN_DOMAIN, PLUGIN_OP, build_gather_subgraph
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
        external.check(m)  # a graph over the external-data threshold is checked by path once written
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
    from quota_export.runtime.runners import gpu_unavailable_reason

    return gpu_unavailable_reason()
