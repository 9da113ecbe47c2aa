"""What every primitive's ONNX form needs: the graph, the reductions' precision, the target.

Precision is a value, not a switch on a shared object: the torch forms take `hp` (the torch
dtype of the order-sensitive reductions, float64 or float32) and the ONNX forms an `Emit` built
with the same choice (`fp64`). Every hp result is rounded once to fp32.
"""

from __future__ import annotations

import numpy as np
import torch

from quota_export.ops.graph import DOUBLE, FLOAT, Graph

TARGETS = ("onnx", "tensorrt")


def hp_dtype(fp64: bool) -> torch.dtype:
    """The torch dtype of the order-sensitive reductions (`export.reductions`)."""
    return torch.float64 if fp64 else torch.float32


class Emit:
    """An ONNX graph being written, with the precision and target its primitives lower to.

        e = Emit(Graph("prefill"), fp64=True)
        y = rmsnorm_onnx(e, x, w, eps, "model/layers.0/input_layernorm")
    """

    def __init__(self, g: Graph, fp64: bool, target: str = "onnx"):
        if target not in TARGETS:
            raise ValueError(f"unknown lowering target {target!r}")
        if fp64 and target == "tensorrt":
            raise ValueError("the tensorrt target needs fp32 reductions (TensorRT has no FP64)")
        self.g = g
        self.fp64 = fp64
        self.target = target

    def op(self, *a, **kw):
        return self.g.op(*a, **kw)

    def const(self, *a, **kw):
        return self.g.const(*a, **kw)

    def init(self, *a, **kw):
        return self.g.init(*a, **kw)

    def scope(self, s: str):
        return self.g.scope(s)

    def ax(self, axes):
        """An int64 axes constant."""
        return self.g.const(list(axes), np.int64)

    def hconst(self, value) -> np.ndarray:
        """`value` as an array in the reductions' precision."""
        return np.asarray(value, np.float64 if self.fp64 else np.float32)

    def hc(self, value):
        """A constant in the reductions' precision."""
        return self.g.const(value, np.float64 if self.fp64 else np.float32)

    def to_hp(self, x):
        return self.g.op("Cast", [x], to=DOUBLE) if self.fp64 else x

    def to_f(self, x):
        return self.g.op("Cast", [x], to=FLOAT) if self.fp64 else x

    def slice(self, t, a: int, b: int, axis: int):
        return self.g.op("Slice", [t, self.ax([a]), self.ax([b]), self.ax([axis])])
