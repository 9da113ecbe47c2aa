"""The per-stage visual-token gather: keep the k best of the N visual rows [start, start+N) by
score (ties: the lower index, as ONNX TopK defines it), in their original order; text rows pass
through, position ids travel with their rows.

    torch: stable_topk (the selection rule), gather_rows (rows and positions)
    ONNX:  build_gather_subgraph (standard ops, the onnx target), build_plugin_node (one
           `quota::TokenGather` node, the tensorrt target; plugins/quotaTokenGather/reference.py
           is its numpy reference), make_gather_model (a standalone model around one gather)

ONNX TopK (opset 11+) defines its tie order: among equal values the element with the lower
index comes first. `torch.topk` promises no tie order, so the torch form never uses it; it takes
a stable descending sort instead, which keeps equal scores in index order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
PLUGIN_DOMAIN, PLUGIN_OP = "quota", "TokenGather"
_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class GatherSubgraph:
    nodes: list[onnx.NodeProto]
    hidden: str  # [B, T-N+k, H]
    position_ids: str  # [B, T-N+k] or [3, B, T-N+k]
    kept: str  # [B, k] int64, indices into the N visual tokens, ascending


def _check(k: int, start: int, n_visual: int, position_ids_rank: int) -> None:
    if not 1 <= k <= n_visual:
        raise ValueError(f"k={k} out of range [1, n_visual={n_visual}]")
    if start < 0:
        raise ValueError(f"start={start} must be >= 0")
    if n_visual >= 2**24:  # the index sort runs on float32 indices, exact below 2**24
        raise ValueError(f"n_visual={n_visual} too large (< 2**24)")
    if position_ids_rank not in (2, 3):
        raise ValueError(f"position_ids_rank must be 2 ([B, T]) or 3 ([3, B, T]), got {position_ids_rank}")


def build_gather_subgraph(
    prefix: str,
    hidden: str,
    position_ids: str,
    scores: str,
    *,
    k: int,
    start: int,
    n_visual: int,
    position_ids_rank: int = 2,
) -> GatherSubgraph:
    """Nodes of the gather in standard ops (opset 21), named `<prefix>/...`, e.g. prefix
    "/model/layers.3/prune" gives "/model/layers.3/prune/TopK". Tensor names are `<node>_output_<i>`.
    k, start and n_visual become Constant nodes (TensorRT needs TopK's K constant).

        scores [B,N] f32 ─ Where(IsNaN, -inf) ─ TopK(k, largest=1, sorted=1) ─ idx [B,k]
        idx ─ Cast(f32) ─ TopK(k, largest=0, sorted=1) ─ Cast(i64) ─► kept    (kept indices, ascending)
        kept + start ─► rows [B,k]
        hidden ──┬─ Slice[:, :start] ──────────────────────┐
                 ├─ GatherND(rows[..., None], batch_dims=1) ┼─ Concat(axis=1) ─► hidden_out [B, T-N+k, H]
                 └─ Slice[:, start+N:] ────────────────────┘
        position_ids ─ Slice / GatherElements(rows, axis=-1) / Slice ─ Concat(axis=-1) ─► position_ids_out

    The head slice is left out when start == 0; the tail slice may be empty (T is dynamic).
    """
    _check(k, start, n_visual, position_ids_rank)
    p = "/" + prefix.strip("/")
    nodes: list[onnx.NodeProto] = []

    def op(name: str, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        full = f"{p}/{name}"
        outs = [f"{full}_output_{i}" for i in range(n_out)]
        nodes.append(helper.make_node(op_type, inputs, outs, name=full, **attrs))
        return outs

    def const(name: str, values) -> str:
        arr = np.asarray(values, dtype=np.int64)
        return op(name, "Constant", [], value=numpy_helper.from_array(arr, f"{p}/{name}"))[0]

    # NaN ranks as -inf (the project's rule; ONNX Runtime's TopK is not NaN-aware)
    is_nan = op("scores/IsNaN", "IsNaN", [scores])[0]
    neg_inf_value = numpy_helper.from_array(np.float32(-np.inf), f"{p}/scores/neg_inf")
    neg_inf = op("scores/neg_inf", "Constant", [], value=neg_inf_value)[0]
    scores = op("scores/Where", "Where", [is_nan, neg_inf, scores])[0]
    k_t = const("k", [k])
    _, idx = op("TopK", "TopK", [scores, k_t], n_out=2, axis=-1, largest=1, sorted=1)
    idx_f = op("sort/Cast", "Cast", [idx], to=TensorProto.FLOAT)[0]
    sorted_f, _ = op("sort/TopK", "TopK", [idx_f, k_t], n_out=2, axis=-1, largest=0, sorted=1)
    kept = op("sort/Cast_1", "Cast", [sorted_f], to=TensorProto.INT64)[0]
    rows = op("rows/Add", "Add", [kept, const("start", start)])[0]

    head = (const("head/starts", [0]), const("head/ends", [start])) if start > 0 else ()
    tail = (const("tail/starts", [start + n_visual]), const("tail/ends", [_INT64_MAX]))

    def concat_parts(name: str, x: str, axis: int, visual: str) -> str:
        ax = const(f"{name}/axes", [axis])
        parts = [op(f"{name}/head/Slice", "Slice", [x, *head, ax])[0]] if head else []
        parts.append(visual)
        parts.append(op(f"{name}/tail/Slice", "Slice", [x, *tail, ax])[0])
        return op(f"{name}/Concat", "Concat", parts, axis=axis)[0]

    rows_nd = op("hidden/Unsqueeze", "Unsqueeze", [rows, const("hidden/unsqueeze_axes", [-1])])[0]
    vis_h = op("hidden/GatherND", "GatherND", [hidden, rows_nd], batch_dims=1)[0]
    hidden_out = concat_parts("hidden", hidden, 1, vis_h)

    if position_ids_rank == 2:
        pos_idx = rows
    else:  # M-RoPE [3, B, T]: the same rows for each of the 3 planes
        r1 = op("position_ids/Unsqueeze", "Unsqueeze", [rows, const("position_ids/unsqueeze_axes", [0])])[0]
        pos_idx = op("position_ids/Expand", "Expand", [r1, const("position_ids/planes", [3, 1, 1])])[0]
    axis = position_ids_rank - 1
    vis_p = op("position_ids/GatherElements", "GatherElements", [position_ids, pos_idx], axis=axis)[0]
    pos_out = concat_parts("position_ids", position_ids, axis, vis_p)
    return GatherSubgraph(nodes=nodes, hidden=hidden_out, position_ids=pos_out, kept=kept)


def build_plugin_node(
    prefix: str, hidden: str, position_ids: str, scores: str, *, k: int, start: int, n_visual: int,
    position_ids_rank: int = 2,
) -> GatherSubgraph:
    """The same gather as one `quota::TokenGather` node (the tensorrt target), `<prefix>/TokenGather`.

    TensorRT's ONNX parser maps a node to a Python (QDP) plugin by op type == plugin name and a string
    attribute `plugin_namespace`; `aot=1` selects the plugin's AOT (PTX) implementation. The
    position ids may be [B, T] or M-RoPE planes [3, B, T]: the plugin reads the rank from the
    tensor (no attribute), as its kernel does (POS_PLANES).
    """
    _check(k, start, n_visual, position_ids_rank)
    full = "/" + prefix.strip("/") + "/TokenGather"
    outs = [f"{full}_output_{i}" for i in range(3)]
    node = helper.make_node(
        PLUGIN_OP, [hidden, position_ids, scores], outs, name=full, domain=PLUGIN_DOMAIN,
        k=k, start=start, n_visual=n_visual, plugin_namespace=PLUGIN_DOMAIN, aot=1,
    )  # fmt: skip
    return GatherSubgraph(nodes=[node], hidden=outs[0], position_ids=outs[1], kept=outs[2])


def make_gather_model(
    *,
    hidden_size: int,
    n_visual: int,
    k: int,
    start: int,
    dtype: int = TensorProto.FLOAT,
    position_ids_rank: int = 2,
    plugin: bool = False,
    prefix: str = "/model/layers.0/prune",
) -> onnx.ModelProto:
    """A standalone model around one gather (tests, plugin parity): inputs hidden [B, T, H],
    position_ids [B, T] | [3, B, T], scores [B, N]; outputs hidden_out, position_ids_out, kept.
    B and T are dynamic ("batch", "seq")."""
    b, t, t_out = "batch", "seq", "seq_out"
    pos_shape = [b, t] if position_ids_rank == 2 else [3, b, t]
    inputs = [
        helper.make_tensor_value_info("hidden", dtype, [b, t, hidden_size]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, pos_shape),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [b, n_visual]),
    ]
    if plugin:
        if position_ids_rank != 2:
            raise ValueError("the plugin node takes position_ids [B, T] for now")
        sub = build_plugin_node(prefix, "hidden", "position_ids", "scores", k=k, start=start, n_visual=n_visual)
    else:
        sub = build_gather_subgraph(
            prefix, "hidden", "position_ids", "scores",
            k=k, start=start, n_visual=n_visual, position_ids_rank=position_ids_rank,
        )  # fmt: skip
    names = ("hidden_out", "position_ids_out", "kept")
    idents = [
        helper.make_node("Identity", [src], [dst], name=f"/output/{dst}")
        for src, dst in zip((sub.hidden, sub.position_ids, sub.kept), names)
    ]
    outputs = [
        helper.make_tensor_value_info("hidden_out", dtype, [b, t_out, hidden_size]),
        helper.make_tensor_value_info("position_ids_out", TensorProto.INT64, pos_shape[:-1] + [t_out]),
        helper.make_tensor_value_info("kept", TensorProto.INT64, [b, k]),
    ]
    graph = helper.make_graph(sub.nodes + idents, "token_gather", inputs, outputs)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(PLUGIN_DOMAIN, 1)] if plugin else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="quota_export")
    model.ir_version = 10
    return model


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] (int64) of the k highest scores of each row of `scores` [B, N].

    - ties: the lower index wins (ONNX TopK's rule), so the result is fully determined by the
      values; -0.0 and +0.0 are equal;
    - NaN scores rank as -inf: below every number, tied with -inf (and so with each other) and
      ordered among those by index. A NaN is never kept while a non-NaN score is dropped;
    - the k indices of a row are returned sorted ascending (the tokens' original order), which is
      how the kept tokens are gathered.

    Integer and floating scores are accepted; `0 <= k <= N`.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(
            f"stable_topk: scores must be a 2-D tensor [B, N], got "
            f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}"
        )
    if scores.dtype == torch.bool or scores.is_complex():
        raise ValueError(f"stable_topk: scores must be real numbers, got {scores.dtype}")
    k = int(k)
    n = scores.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"stable_topk: k={k} out of range [0, {n}]")
    if scores.is_floating_point():
        scores = torch.where(torch.isnan(scores), float("-inf"), scores)
    # stable=True keeps equal keys in index order, also with descending=True
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values.to(torch.int64)


def gather_rows(h, pos, idx, start: int, n: int):
    """Keep the visual rows `idx` [1,k] (ascending) of the span [start, start+n) of h [1,T,D] and of
    the positions pos [1,T] (or planes [P,1,T]) -> (h', pos', rows [T']); text rows stay."""
    T = h.shape[1]
    rows = torch.cat([torch.arange(start), start + idx[0], torch.arange(start + n, T)])
    return h.index_select(1, rows), pos.index_select(pos.dim() - 1, rows), rows
