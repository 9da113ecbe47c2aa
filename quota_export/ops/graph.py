"""A small ONNX graph builder with hierarchical, stable node names.

    g = Graph("prefill"); x = g.input("inputs_embeds", FLOAT, [1, "seq", 64])
    with g.scope("/model/layers.3/attn"):
        y = g.op("MatMul", [x, w], name="q_proj/MatMul")   # node "/model/layers.3/attn/q_proj/MatMul"
Tensor names are derived from node names (`<node>:0`), so the same build gives the same bytes.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quota_export import __version__

FLOAT, DOUBLE, INT64, UINT8, INT4, INT8 = (
    TensorProto.FLOAT,
    TensorProto.DOUBLE,
    TensorProto.INT64,
    TensorProto.UINT8,
    TensorProto.INT4,
    TensorProto.INT8,
)


class Graph:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._scope: list[str] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        # inside lower/external.py `streaming`: initializers go to the graph's data file as they come
        from quota_export.lower.external import Spill

        self.spill = Spill.current(name)

    @contextlib.contextmanager
    def scope(self, s: str):
        self._scope.append(s.strip("/"))
        try:
            yield
        finally:
            self._scope.pop()

    def _full(self, name: str) -> str:
        full = "/" + "/".join(self._scope + [name])
        if full in self._names:
            i = 1
            while f"{full}_{i}" in self._names:
                i += 1
            full = f"{full}_{i}"
        self._names.add(full)
        return full

    def input(self, name, dtype, shape):
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, tensor: str, name: str, dtype, shape):
        """Expose `tensor` as graph output `name` (through an Identity)."""
        self.nodes.append(helper.make_node("Identity", [tensor], [name], name=self._full(f"output/{name}")))
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, n_out: int = 1, domain: str = "", **attrs):
        full = self._full(name or op_type)
        outs = [f"{full}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=full, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, name: str, arr: np.ndarray) -> str:
        full = self._full(name)
        t = numpy_helper.from_array(np.asarray(arr, order="C"), full)  # keeps 0-d scalars 0-d
        return self._add(t)

    def _add(self, t: onnx.TensorProto) -> str:
        if self.spill is not None:
            t = self.spill.add(t)  # its bytes in the data file, not in memory
        self.inits.append(t)
        return t.name

    def init_int4(self, name: str, q: np.ndarray, signed: bool = True) -> str:
        """An INT4 (values in [-8, 7]) or UINT4 ([0, 15]) initializer, stored as raw bytes packed
        two per byte, element 2i in the low nibble (ONNX's layout)."""
        full = self._full(name)
        flat = q.astype(np.int16).flatten() & 0xF
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, flat.dtype)])
        packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
        dt = INT4 if signed else TensorProto.UINT4
        return self._add(helper.make_tensor(full, dt, list(q.shape), packed, raw=True))

    def const(self, value, dtype=np.float32) -> str:
        """A shared scalar / small constant initializer (deduplicated by value)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const/{arr.dtype.name}_{len(self._consts)}", arr)
        return self._consts[key]

    def model(self, opset: int) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=self.inits)
        m = helper.make_model(
            g,
            opset_imports=[helper.make_opsetid("", opset)]
            + [helper.make_opsetid(d, 1) for d in sorted({n.domain for n in self.nodes if n.domain})],
            producer_name="quota_export",
            producer_version=__version__,
        )
        m.ir_version = 10
        if self.spill is not None:
            self.spill.finish(m)
        return m
