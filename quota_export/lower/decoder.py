"""Lower the deployed decoder (reference.py's numerics) into prefill and decode ONNX graphs.

Every op here mirrors one op of `reference.Deployed`, in the same order and precision (fp32;
the order-sensitive reductions in float64 with `export.reductions: fp64`, cast once to fp32;
quantized matmuls exact), so the graphs and the reference agree bit for bit in practice:

    prefill:  inputs_embeds [1,T,D], position_ids [1,T]
              -> per layer: [stage: score -> TopK(k) -> ascending -> Gather rows/positions
                                    (-> merge counts)]
                            RMSNorm -> Q/DQ(int4, per-token) -> MatMul(DQ(int4 W)) ...
              -> logits [1,V] (last position), present.{l}.{key,value}[...] , kept.{s} [1,k]
                 (+ merge.{s} [1,k] fp32 with pruning.merge: proportional)
    decode:   inputs_embeds [1,1,D], position_ids [1,1], past.{l}.* (lengths differ by layer)
              (+ merge.{s} [1,k]: prefill's, fed unchanged to every step)
              -> logits [1,V], present.{l}.* (past ++ this step, at the quantized width)

Merging (pruning.merge: proportional, `Deployed.merge_counts`): merge.{s} holds how many of the
original visual tokens each kept token of stage s stands for (integers, exact in any precision).
From stage s on, every attention (the layers' and the next stages' scoring) adds
log(merge.{s}) to the logits of those keys (text before the image gets 0, keys after the kept
tokens none); decode rebuilds that bias from its merge.{s} inputs.

KV cache at the boundary (`kv_bits` 4 or 8, asymmetric, groups of g along head_dim):
    q uint8 [1,kvh,T,d] (8-bit) or [1,kvh,T,d/2] (4-bit, two per byte: lo | hi << 4),
    scale fp32 [1,kvh,T,d/g], zero uint8 [1,kvh,T,d/g];  fp32 [1,kvh,T,d] when unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch

from quota_export.lower.gather_onnx import build_gather_subgraph, build_plugin_node
from quota_export.lower.graph import DOUBLE, FLOAT, INT64, UINT8, Graph
from quota_export.lower import intlinear
from quota_export.quant.quantizers import EPS
from quota_export.reference import LINEARS, SCORE_GRID_BITS, Deployed

SHORT = {
    "self_attn.q_proj": "attn/q_proj",
    "self_attn.k_proj": "attn/k_proj",
    "self_attn.v_proj": "attn/v_proj",
    "self_attn.o_proj": "attn/o_proj",
    "mlp.gate_proj": "mlp/gate_proj",
    "mlp.up_proj": "mlp/up_proj",
    "mlp.down_proj": "mlp/down_proj",
}


@dataclass
class KVNames:
    """Names of one layer's cache tensors (key or value) in a graph."""

    q: str
    scale: str | None = None
    zero: str | None = None


def kv_io_names(prefix: str, l: int, which: str, quantized: bool) -> list[str]:
    base = f"{prefix}.{l}.{which}"
    return [base, f"{base}_scale", f"{base}_zero"] if quantized else [base]


class DecoderLowering:
    def __init__(self, dep: Deployed, n_visual: int, visual_start: int, target: str = "onnx"):
        if target not in ("onnx", "tensorrt"):
            raise ValueError(f"unknown lowering target {target!r}")
        self.target = target
        self.dep = dep
        self.spec = dep.spec
        self.cfg = dep.cfg
        self.n_visual = n_visual
        self.visual_start = visual_start
        self._w_cache: dict[str, str] = {}
        self._codes_f: dict[str, str] = {}
        self.fp64 = dep.cfg.fp64
        # export.matmul: integer (exact by construction, see lower/intlinear.py); TensorRT keeps float
        self.integer = target == "onnx" and dep.cfg.int_mm and dep.cfg.a_bits < 16
        if self.fp64 and target == "tensorrt":
            raise ValueError("the tensorrt target needs fp32 reductions (Deployed.set_reductions(False))")

    # ------------------------------------------------------------------ precision (see reference.Deployed)
    def hconst(self, value) -> np.ndarray:
        return np.asarray(value, np.float64 if self.fp64 else np.float32)

    def to_hp(self, g: Graph, x):
        return g.op("Cast", [x], to=DOUBLE) if self.fp64 else x

    def to_f(self, g: Graph, x):
        return g.op("Cast", [x], to=FLOAT) if self.fp64 else x

    def hc(self, g: Graph, value):
        """A constant in the reductions' precision."""
        return g.const(value, np.float64 if self.fp64 else np.float32)

    def pos_shape(self, seq):
        planes = self.dep.rope_planes
        return [1, seq] if planes is None else [int(max(planes)) + 1, 1, seq]

    # ------------------------------------------------------------------ primitives
    def ax(self, g: Graph, axes):
        return g.const(list(axes), np.int64)

    def rmsnorm(self, g: Graph, x, w: np.ndarray, name: str):
        """w * (x * r), r = 1 / sqrt(mean(x^2) + eps) in the reductions' precision"""
        with g.scope(name):
            xh = self.to_hp(g, x)
            sq = g.op("Mul", [xh, xh], name="Pow")
            v = g.op("ReduceMean", [sq, self.ax(g, [-1])], keepdims=1)
            r = g.op("Sqrt", [g.op("Add", [v, self.hc(g, self.spec.rms_eps)])])
            r = self.to_f(g, g.op("Reciprocal", [r]))
            y = g.op("Mul", [x, r])
            return g.op("Mul", [g.init("weight", w.astype(np.float32)), y], name="MulWeight")

    def act_qdq(self, g: Graph, x, dim: int, name: str):
        """INT4/INT8 per-token dynamic symmetric quantization, scale computed in the graph.

        x -> Abs -> ReduceMax(-1) -> Max(eps) -> Div(qmax) = s;  q = Cast(Q(x, s), float)
        Returns (q, s): the integers as float and the per-token scale, which `linear` applies
        after the MatMul, (q @ W) * s, so the sum is exact (see quant/quantizers.py).
        """
        bits = self.cfg.a_bits
        qmax = 2 ** (bits - 1) - 1
        with g.scope(name):
            a = g.op("Abs", [x])
            m = g.op("ReduceMax", [a, self.ax(g, [-1])], keepdims=1)
            m = g.op("Max", [m, g.const(EPS)])
            s = g.op("Div", [m, g.const(float(qmax))], name="Scale")
            if self.integer:  # uint8 codes + zero point for MatMulInteger (lower/intlinear.py)
                return intlinear.act_codes(g, x, s, bits), s
            if self.target == "tensorrt":
                # TensorRT has no INT4 activations and wants constant Q/DQ scales: the same
                # numerics in float (round-half-even + saturate), exact to the Q/DQ pair.
                q = g.op("Round", [g.op("Div", [x, s])])
                return g.op("Clip", [q, g.const(float(-qmax - 1)), g.const(float(qmax))], name="Saturate"), s
            dt = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
            q = g.op("QuantizeLinear", [x, s], axis=-1, block_size=dim, output_dtype=dt)
            # Cast, not DequantizeLinear(q, 1): ONNX Runtime fuses DQ(int4 W) + MatMul into its 4-bit
            # MatMul only when the weight is the MatMul's single DQ input
            return g.op("Cast", [q], to=FLOAT, name="Integers"), s

    def float_codes(self, g: Graph, xq):
        """The activation integers as fp32 (xq[0] itself, or the uint8 codes minus their zero point)."""
        if not self.integer:
            return xq[0]
        if xq[0] not in self._codes_f:
            zp, _ = intlinear.code_range(self.cfg.a_bits)
            f = g.op("Cast", [xq[0]], to=FLOAT, name="codes_float")
            self._codes_f[xq[0]] = g.op("Sub", [f, g.const(float(zp))], name="Integers")
        return self._codes_f[xq[0]]

    def weight(self, g: Graph, l: int, lin: str):
        """The MatMul B operand: DQ(int4 blocked const) or an fp32 constant, [in, out]."""
        key = f"{l}.{lin}"
        if key in self._w_cache:
            return self._w_cache[key]
        name = f"{self.spec.module_prefix}.layers.{l}.{lin}"
        qw = self.dep.qweights.get(name)
        with g.scope(f"model/layers.{l}/{SHORT[lin]}"):
            if qw is None:
                out = g.init("weight", self.dep.W[l][lin].T.numpy().astype(np.float32))
            else:
                q = qw.q.numpy().T  # [in, out]
                sc = g.init("scale", qw.scale.numpy().T.astype(np.float32))  # [in/g, out]
                if qw.zero_point is None:
                    qi = g.init_int4("weight_q", q) if qw.bits == 4 else g.init("weight_q", q.astype(np.int8))
                    ins = [qi, sc]
                else:
                    if qw.bits == 4:
                        full = g.init_int4("weight_q", q, signed=False)
                        zfull = g.init_int4("zero_point", qw.zero_point.numpy().T, signed=False)
                        ins = [full, sc, zfull]
                    else:
                        ins = [g.init("weight_q", q.astype(np.uint8)), sc, g.init("zero_point", qw.zero_point.numpy().T.astype(np.uint8))]
                out = g.op("DequantizeLinear", ins, axis=0, block_size=qw.group_size)
        self._w_cache[key] = out
        return out

    def linear(self, g: Graph, x, l: int, lin: str, x_q=None):
        """MatMul with (optionally) quantized input; `x_q` reuses an already quantized input."""
        quant = self.dep.quantized[l][lin] and self.cfg.a_bits < 16
        if quant and x_q is None:
            dim = self.dep.W[l][lin].shape[1]
            x_q = self.act_qdq(g, x, dim, f"model/layers.{l}/{SHORT[lin]}/input_quant")
        qw = self.dep.qweights.get(f"{self.spec.module_prefix}.layers.{l}.{lin}")
        plan = intlinear.plan(qw, self.cfg.a_bits) if quant and self.integer else None
        if plan is not None:
            with g.scope(f"model/layers.{l}/{SHORT[lin]}"):
                y = intlinear.integer_matmul(g, x_q[0], qw, self.cfg.a_bits, plan)
        else:
            xin = self.float_codes(g, x_q) if quant else x
            w = self.weight(g, l, lin)
        with g.scope(f"model/layers.{l}/{SHORT[lin]}"):
            if plan is None:
                y = g.op("MatMul", [xin, w])
            if quant:
                y = g.op("Mul", [y, x_q[1]], name="ActScale")
            b = self.dep.B[l][lin]
            return y if b is None else g.op("Add", [y, g.init("bias", b.numpy().astype(np.float32))], name="Bias")

    def heads(self, g: Graph, x, n_heads: int, name: str):
        """[1,T,n*d] -> [1,n,T,d]"""
        with g.scope(name):
            r = g.op("Reshape", [x, g.const([1, -1, n_heads, self.spec.head_dim], np.int64)])
            return g.op("Transpose", [r], perm=[0, 2, 1, 3])

    def rope_tables(self, g: Graph, pos, name: str):
        """position_ids [1,T] -> cos, sin [1,1,T,d]"""
        with g.scope(name):
            p = g.op("Cast", [pos], to=DOUBLE if self.fp64 else FLOAT)
            if self.dep.rope_planes is not None:
                # M-RoPE: [P,1,T] -> frequency f reads plane rope_planes[f] -> [1,T,d/2]
                sel = g.op("Gather", [p, g.init("planes", self.dep.rope_planes.numpy().astype(np.int64))], axis=0)
                p = g.op("Transpose", [sel], perm=[1, 2, 0])
            else:
                p = g.op("Unsqueeze", [p, self.ax(g, [-1])])
            f = g.op("Mul", [p, g.init("inv_freq", self.hconst(self.dep.inv_freq.numpy()))])
            e = g.op("Concat", [f, f], axis=-1)
            cos = g.op("Unsqueeze", [self.to_f(g, g.op("Cos", [e])), self.ax(g, [1])], name="cos")
            sin = g.op("Unsqueeze", [self.to_f(g, g.op("Sin", [e])), self.ax(g, [1])], name="sin")
            return cos, sin

    def rope(self, g: Graph, x, cos, sin, name: str):
        """x * cos + rotate_half(x) * sin"""
        h = self.spec.head_dim // 2
        with g.scope(name):
            x1, x2 = g.op("Split", [x, g.const([h, h], np.int64)], axis=-1, n_out=2)
            rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
            return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])

    def kv_quant(self, g: Graph, x, name: str):
        """x [1,kvh,T,d] -> (x dequantized, KVNames at the boundary width)."""
        bits = self.cfg.kv_bits
        d = self.spec.head_dim
        gs = self.cfg.kv_group or d
        qmax = float(2**bits - 1)
        with g.scope(name):
            xg = g.op("Reshape", [x, g.const([1, self.spec.kv_heads, -1, d // gs, gs], np.int64)])
            # the range always includes 0 (as quantizers.kv_params), so the zero point fits
            mn = g.op("Min", [g.op("ReduceMin", [xg, self.ax(g, [-1])], keepdims=1), g.const(0.0)])
            mx = g.op("Max", [g.op("ReduceMax", [xg, self.ax(g, [-1])], keepdims=1), g.const(0.0)])
            s = g.op("Div", [g.op("Max", [g.op("Sub", [mx, mn]), g.const(EPS)]), g.const(qmax)], name="Scale")
            z = g.op("Round", [g.op("Div", [g.op("Neg", [mn]), s])])
            z = g.op("Clip", [z, g.const(0.0), g.const(qmax)], name="ZeroPoint")
            q = g.op("Add", [g.op("Round", [g.op("Div", [xg, s])]), z])
            q = g.op("Clip", [q, g.const(0.0), g.const(qmax)], name="Quant")
            deq = g.op("Mul", [g.op("Sub", [q, z]), s], name="Dequant")
            deq = g.op("Reshape", [deq, g.const([1, self.spec.kv_heads, -1, d], np.int64)])
            qu8 = g.op("Cast", [g.op("Reshape", [q, g.const([1, self.spec.kv_heads, -1, d], np.int64)])], to=UINT8)
            if bits == 4:
                qu8 = self.pack4(g, qu8)
            s_out = g.op("Squeeze", [s, self.ax(g, [-1])], name="ScaleOut")
            z_out = g.op("Cast", [g.op("Squeeze", [z, self.ax(g, [-1])])], to=UINT8, name="ZeroOut")
            return deq, KVNames(qu8, s_out, z_out)

    def pack4(self, g: Graph, q):
        """uint8 [...,d] holding 0..15 -> [...,d/2]: even | odd << 4"""
        with g.scope("pack4"):
            r = g.op("Reshape", [q, g.const([1, self.spec.kv_heads, -1, self.spec.head_dim // 2, 2], np.int64)])
            lo, hi = g.op("Split", [r, g.const([1, 1], np.int64)], axis=-1, n_out=2)
            p = g.op("Add", [lo, g.op("Mul", [hi, g.const(16, np.uint8)])])
            return g.op("Squeeze", [p, self.ax(g, [-1])])

    def unpack4(self, g: Graph, p):
        with g.scope("unpack4"):
            hi = g.op("Div", [p, g.const(16, np.uint8)])
            lo = g.op("Sub", [p, g.op("Mul", [hi, g.const(16, np.uint8)])])
            st = g.op("Concat", [g.op("Unsqueeze", [lo, self.ax(g, [-1])]), g.op("Unsqueeze", [hi, self.ax(g, [-1])])], axis=-1)
            return g.op("Reshape", [st, g.const([1, self.spec.kv_heads, -1, self.spec.head_dim], np.int64)])

    def kv_dequant(self, g: Graph, names: KVNames, name: str):
        """boundary cache tensors -> fp32 [1,kvh,T,d] (exactly (q - z) * s)."""
        d = self.spec.head_dim
        gs = self.cfg.kv_group or d
        with g.scope(name):
            q = names.q if self.cfg.kv_bits == 8 else self.unpack4(g, names.q)
            qf = g.op("Reshape", [g.op("Cast", [q], to=FLOAT), g.const([1, self.spec.kv_heads, -1, d // gs, gs], np.int64)])
            z = g.op("Unsqueeze", [g.op("Cast", [names.zero], to=FLOAT), self.ax(g, [-1])])
            s = g.op("Unsqueeze", [names.scale, self.ax(g, [-1])])
            x = g.op("Mul", [g.op("Sub", [qf, z]), s])
            return g.op("Reshape", [x, g.const([1, self.spec.kv_heads, -1, d], np.int64)])

    def repeat_kv(self, g: Graph, x, name: str):
        rep = self.spec.heads // self.spec.kv_heads
        if rep == 1:
            return x
        with g.scope(name):
            u = g.op("Unsqueeze", [x, self.ax(g, [2])])
            sh = g.op("Shape", [u])
            t = g.op("Slice", [sh, self.ax(g, [3]), self.ax(g, [4])])
            target = g.op("Concat", [g.const([1, self.spec.kv_heads, rep], np.int64), t, g.const([self.spec.head_dim], np.int64)], axis=0)
            e = g.op("Expand", [u, target])
            return g.op("Reshape", [e, g.const([1, self.spec.heads, -1, self.spec.head_dim], np.int64)])

    def causal_mask(self, g: Graph, scores, offset: int | None, name: str):
        """masked_fill(j > i + offset, -inf) on [1,H,Tq,Tk] scores; offset None = no mask."""
        if offset is None:
            return scores
        with g.scope(name):
            sh = g.op("Shape", [scores])
            tq = g.op("Squeeze", [g.op("Slice", [sh, self.ax(g, [2]), self.ax(g, [3])]), self.ax(g, [0])])
            tk = g.op("Squeeze", [g.op("Slice", [sh, self.ax(g, [3]), self.ax(g, [4])]), self.ax(g, [0])])
            i = g.op("Range", [g.const(offset, np.int64), g.op("Add", [tq, g.const(offset, np.int64)]), g.const(1, np.int64)])
            j = g.op("Range", [g.const(0, np.int64), tk, g.const(1, np.int64)])
            cond = g.op("Greater", [g.op("Unsqueeze", [j, self.ax(g, [0])]), g.op("Unsqueeze", [i, self.ax(g, [1])])])
            return g.op("Where", [cond, self.hc(g, -np.inf), scores])

    def attend(self, g: Graph, q, k, v, offset, name: str, bias=None):
        """`bias` = (hp [T0], T0) from `key_bias`, added to the scores of the first T0 = start+k keys."""
        with g.scope(name):
            q = self.to_hp(g, q)
            k = self.to_hp(g, self.repeat_kv(g, k, "repeat_k"))
            v = self.to_hp(g, self.repeat_kv(g, v, "repeat_v"))
            s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])], name="QK")
            # the scale as a [1,H,1,1] constant, not a scalar: ONNX Runtime's MatMulScaleFusion folds
            # a scalar into FusedMatMul's alpha, a float32 attribute, so fp64 scores would be scaled
            # by float32(1/sqrt(d)) (a 1e-8 relative error, a last-bit difference in ~20% of the
            # attention outputs and, through the 4-bit quantizers, flipped kept tokens)
            scale = np.full((1, self.spec.heads, 1, 1), self.spec.head_dim**-0.5)
            s = g.op("Mul", [s, self.hc(g, scale)], name="scale")
            if bias is not None:
                # zeros for the keys after the kept tokens (their count is dynamic): + 0 is exact
                b, t0 = bias
                tk = g.op("Slice", [g.op("Shape", [s]), self.ax(g, [3]), self.ax(g, [4])])
                rest = g.op("Sub", [tk, g.const([t0], np.int64)], name="bias_rest")
                pad = g.op("ConstantOfShape", [rest], value=onnx.numpy_helper.from_array(self.hconst([0.0])))
                s = g.op("Add", [s, g.op("Concat", [b, pad], axis=0, name="bias_full")], name="key_bias")
            s = self.causal_mask(g, s, offset, "mask")
            p = g.op("Softmax", [s], axis=-1)
            return p, self.to_f(g, g.op("MatMul", [p, v], name="PV"))

    # ------------------------------------------------------------------ merging (pruning.merge: proportional)
    def key_bias(self, g: Graph, cnt, k: int, name: str):
        """counts [1,k] (float) -> (bias hp [start+k], start+k): 0 on the text before the image,
        log(count) on the kept tokens (`Deployed.key_bias`). The log is a lookup in a table of
        torch's own values, not a Log node: ONNX Runtime's Log differs from torch's in the last bit
        on 23% of the integers 1..5000 in fp64 (3% in fp32), and the counts are integers 1..n_visual."""
        s0 = self.visual_start
        with g.scope(name):
            table = self.hc(g, torch.arange(self.n_visual + 1, dtype=torch.float64).log().numpy())  # [0] = -inf, unused
            idx = g.op("Cast", [g.op("Reshape", [cnt, self.ax(g, [-1])])], to=INT64, name="count")
            lg = g.op("Gather", [table, idx], axis=0, name="log_count")
            if s0 == 0:
                return lg, k
            return g.op("Concat", [self.hc(g, np.zeros(s0)), lg], axis=0, name="bias"), s0 + k

    def merge_counts(self, g: Graph, cosine, kept, cnt, n: int, k: int):
        """Counts [1,k] of the kept tokens after a stage (`Deployed.merge_counts`): each dropped
        token's count goes to its most similar kept token (first maximum of its cosine row over
        the kept columns). cosine hp [1,n,n], kept int64 [k] ascending, cnt hp [1,n]."""
        with g.scope("merge"):
            ck = g.op("Gather", [cosine, kept], axis=2, name="cosine_kept")  # [1,n,k]
            # the first maximum spelled out (ReduceMax, Equal, ReduceMin of the column): tokens with
            # identical codes tie exactly, which is the case merging is for, and TensorRT does not
            # document how its ArgMax (a TopK) breaks ties
            top = g.op("ReduceMax", [ck, self.ax(g, [-1])], keepdims=1)
            col = self.hc(g, np.arange(k))
            cand = g.op("Where", [g.op("Equal", [ck, top]), col, self.hc(g, float(k))])
            first = g.op("ReduceMin", [cand, self.ax(g, [-1])], keepdims=1, name="nearest_kept")  # [1,n,1]
            onehot = g.op("Cast", [g.op("Equal", [first, col])], to=DOUBLE if self.fp64 else FLOAT, name="onehot")
            # the dropped tokens' counts (kept ones zeroed), summed into their nearest kept token:
            # integers, exact in any order
            kidx = g.op("Unsqueeze", [kept, self.ax(g, [0])])
            w = g.op("ScatterElements", [cnt, kidx, self.hc(g, np.zeros((1, k)))], axis=1, name="dropped")
            moved = g.op("MatMul", [g.op("Unsqueeze", [w, self.ax(g, [1])]), onehot], name="moved")  # [1,1,k]
            return g.op("Add", [g.op("Gather", [cnt, kept], axis=1), g.op("Squeeze", [moved, self.ax(g, [1])])],
                        name="counts")

    def score(self, g: Graph, st, h, xn, xq, q, k, v, kd, vd, cosine, n: int, bias=None):
        """`select: topk`: the stage score [1,n] fp32 (`reference.stage_score` of `Deployed.signals`)."""
        s0 = self.visual_start
        sl = lambda t, a, b, axis: g.op("Slice", [t, self.ax(g, [a]), self.ax(g, [b]), self.ax(g, [axis])])  # noqa: E731
        hv = self.to_hp(g, sl(h, s0, s0 + n, 1))
        mag = g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [hv, hv]), self.ax(g, [-1])], keepdims=0)], name="magnitude")
        # diversity: 1 - max_{j<i} cos(f_i, f_j); Where masks j >= i with -1 (the first token gets 2)
        later = g.const(np.triu(np.ones((n, n), bool)), np.bool_)
        cs = g.op("Where", [later, self.hc(g, -1.0), cosine], name="cosine_earlier")
        div = g.op("Sub", [self.hc(g, 1.0), g.op("ReduceMax", [cs, self.ax(g, [-1])], keepdims=0)], name="diversity")
        qt = sl(q, s0 + n, 1 << 30, 2)
        p, _ = self.attend(g, qt, kd, vd, s0 + n, "score_attn", bias)
        pv = sl(p, s0, s0 + n, 3)
        att = g.op("ReduceMean", [pv, self.ax(g, [1, 2])], keepdims=0, name="attention")
        (wm, wa, wr, wd), (sm, sa, sr, sd) = st.w, st.sigma
        # risk is computed even at weight 0, as the reference does
        xv = sl(xn, s0, s0 + n, 1)
        xdq = xn if xq is None else g.op("Mul", [self.float_codes(g, xq), xq[1]], name="dequant_input")
        xqv = sl(xdq, s0, s0 + n, 1)
        dif = self.to_hp(g, g.op("Sub", [xqv, xv]))
        xvh = self.to_hp(g, xv)
        num = g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [dif, dif]), self.ax(g, [-1])], keepdims=0)])
        den = g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [xvh, xvh]), self.ax(g, [-1])], keepdims=0)])
        risk = g.op("Div", [num, g.op("Max", [den, self.hc(g, 1e-12)])], name="risk_act")
        if self.cfg.kv_bits < 16:
            for nm, fq, fp in (("k", kd, k), ("v", vd, v)):
                a = sl(fq, s0, s0 + n, 2)
                b = self.to_hp(g, sl(fp, s0, s0 + n, 2))
                dd = self.to_hp(g, g.op("Sub", [a, sl(fp, s0, s0 + n, 2)]))
                nn = g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [dd, dd]), self.ax(g, [1, 3])], keepdims=0)])
                dn = g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [b, b]), self.ax(g, [1, 3])], keepdims=0)])
                risk = g.op("Add", [risk, g.op("Div", [nn, g.op("Max", [dn, self.hc(g, 1e-12)])])], name=f"risk_{nm}")
        score = g.op("Add", [g.op("Mul", [self.hc(g, wm / sm), mag]), g.op("Mul", [self.hc(g, wa / sa), att])])
        score = g.op("Sub", [score, g.op("Mul", [self.hc(g, wr / sr), risk])])
        score = g.op("Add", [score, g.op("Mul", [self.hc(g, wd / sd), div])], name="score_raw")
        score = g.op("Round", [g.op("Mul", [score, self.hc(g, float(2**SCORE_GRID_BITS))])])
        score = g.op("Cast", [score], to=FLOAT, name="score")
        return score

    def maxmin_score(self, g: Graph, cosine, n: int, k: int):
        """`select: maxmin` (`Deployed.maxmin_score`): greedy max-min selection of k of the n
        tokens on the cosine matrix hp [1,n,n], unrolled (k is static), as a score [1,n] fp32 that
        gives the i-th pick k - i and the rest 0. Every argmin is the first minimum spelled out
        (ReduceMin, Equal, ReduceMin of the index), as in `merge_counts`."""
        with g.scope("maxmin"):
            idx = self.hc(g, np.arange(n)[None])  # [1,n]
            big = self.hc(g, float(n))

            def first_min(x, nm):  # [1,n] -> index [1,1] (hp), the lowest index among the minima
                m = g.op("ReduceMin", [x, self.ax(g, [-1])], keepdims=1)
                return g.op("ReduceMin", [g.op("Where", [g.op("Equal", [x, m]), idx, big]), self.ax(g, [-1])],
                            keepdims=1, name=nm)

            def column(i, nm):  # cosine[:, :, i] -> [1,n]
                j = g.op("Cast", [g.op("Reshape", [i, self.ax(g, [-1])])], to=INT64)
                return g.op("Reshape", [g.op("Gather", [cosine, j], axis=2), self.ax(g, [1, n])], name=nm)

            eye = g.const(np.eye(n, dtype=bool)[None], np.bool_)
            near = g.op("ReduceMax", [g.op("Where", [eye, self.hc(g, -np.inf), cosine]), self.ax(g, [-1])],
                        keepdims=0, name="nearest")  # [1,n]
            pick = first_min(near, "pick_0")
            hit = g.op("Equal", [idx, pick])
            picked = hit
            score = g.op("Where", [hit, g.const(float(k)), g.const(np.zeros((1, n), np.float32))])
            to_sel = column(pick, "to_picked_0")
            for t in range(1, k):
                cand = g.op("Where", [picked, self.hc(g, np.inf), to_sel])
                pick = first_min(cand, f"pick_{t}")
                hit = g.op("Equal", [idx, pick])
                picked = g.op("Or", [picked, hit])
                score = g.op("Where", [hit, g.const(float(k - t)), score])
                if t < k - 1:
                    to_sel = g.op("Max", [to_sel, column(pick, f"column_{t}")], name=f"to_picked_{t}")
            return g.op("Identity", [score], name="score")

    # ------------------------------------------------------------------ blocks
    def qkv(self, g: Graph, l: int, h, cos, sin):
        sp = self.spec
        xn = self.rmsnorm(g, h, self.dep.ln1[l].numpy(), f"model/layers.{l}/input_layernorm")
        xq = None
        if self.dep.quantized[l]["self_attn.q_proj"] and self.cfg.a_bits < 16:
            xq = self.act_qdq(g, xn, sp.hidden, f"model/layers.{l}/attn/input_quant")
        q = self.linear(g, xn, l, "self_attn.q_proj", xq)
        k = self.linear(g, xn, l, "self_attn.k_proj", xq)
        v = self.linear(g, xn, l, "self_attn.v_proj", xq)
        q = self.rope(g, self.heads(g, q, sp.heads, f"model/layers.{l}/attn/q_heads"), cos, sin, f"model/layers.{l}/attn/q_rope")
        k = self.rope(g, self.heads(g, k, sp.kv_heads, f"model/layers.{l}/attn/k_heads"), cos, sin, f"model/layers.{l}/attn/k_rope")
        v = self.heads(g, v, sp.kv_heads, f"model/layers.{l}/attn/v_heads")
        return xn, xq, q, k, v

    def post_attn(self, g: Graph, l: int, h, o):
        sp = self.spec
        with g.scope(f"model/layers.{l}/attn"):
            o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.const([1, -1, sp.heads * sp.head_dim], np.int64)], name="merge_heads")
        h = g.op("Add", [h, self.linear(g, o, l, "self_attn.o_proj")], name=f"model/layers.{l}/attn/residual")
        xn = self.rmsnorm(g, h, self.dep.ln2[l].numpy(), f"model/layers.{l}/post_attention_layernorm")
        xq = None
        if self.dep.quantized[l]["mlp.gate_proj"] and self.cfg.a_bits < 16:
            xq = self.act_qdq(g, xn, sp.hidden, f"model/layers.{l}/mlp/input_quant")
        gt = self.linear(g, xn, l, "mlp.gate_proj", xq)
        up = self.linear(g, xn, l, "mlp.up_proj", xq)
        with g.scope(f"model/layers.{l}/mlp"):
            gh = self.to_hp(g, gt)
            a = g.op("Mul", [self.to_f(g, g.op("Mul", [gh, g.op("Sigmoid", [gh])], name="silu")), up], name="act")
        down = self.linear(g, a, l, "mlp.down_proj")
        return g.op("Add", [h, down], name=f"model/layers.{l}/mlp/residual")

    def kv_store(self, g: Graph, l: int, k, v):
        if self.cfg.kv_bits >= 16:
            return k, v, KVNames(k), KVNames(v)
        kd, kn = self.kv_quant(g, k, f"model/layers.{l}/attn/k_cache_quant")
        vd, vn = self.kv_quant(g, v, f"model/layers.{l}/attn/v_cache_quant")
        return kd, vd, kn, vn

    def stage(self, g: Graph, si: int, st, l: int, h, pos, orig, n: int, cnt=None, bias=None):
        """Score the n visual tokens at [start, start+n), keep the top st.keep (ascending).

            h ─┬─ signals(magnitude, attention, risk, diversity) ─ weighted sum = scores [1,n]
               │   (select: maxmin: the unrolled greedy max-min picks as scores, `maxmin_score`)
               │   TopK(k, largest, sorted: lower index wins ties) -> idx -> TopK(idx, smallest) = ascending
               └─ Concat(h[:, :s], Gather(h[:, s:s+n], idx), h[:, s+n:])   (same for position ids)

        Merging: `cnt` hp [1,n] = the counts so far (ones at the first stage), `bias` the key bias
        of the previous stage (the scoring attention sees it); returns the new counts [1,k] too.
        """
        s0 = self.visual_start
        with g.scope(f"model/layers.{l}/prune"):
            cos, sin = self.rope_tables(g, pos, "rope")
        xn, xq, q, k, v = self.qkv(g, l, h, cos, sin)
        with g.scope(f"model/layers.{l}/prune"):
            kd, vd, kn, vn = self.kv_store(g, l, k, v)
            sl = lambda t, a, b, axis: g.op("Slice", [t, self.ax(g, [a]), self.ax(g, [b]), self.ax(g, [axis])])
            # cosine of the attention input's integer codes (else the normed input): f f^T is exact
            # on integers; the diversity signal, max-min selection and merging read it
            f = self.to_hp(g, sl(xn if xq is None else self.float_codes(g, xq), s0, s0 + n, 1))
            nf = g.op("Max", [g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [f, f]), self.ax(g, [-1])], keepdims=1)]),
                              self.hc(g, 1e-12)], name="code_norm")  # [1, n, 1]
            dot = g.op("MatMul", [f, g.op("Transpose", [f], perm=[0, 2, 1])], name="code_dot")
            cosine = g.op("Div", [g.op("Div", [dot, nf]), g.op("Transpose", [nf], perm=[0, 2, 1])], name="cosine")
            if st.select == "maxmin":
                score = self.maxmin_score(g, cosine, n, st.keep)
            else:
                score = self.score(g, st, h, xn, xq, q, k, v, kd, vd, cosine, n, bias)
            prefix = f"/model/layers.{l}/prune/gather"
            build = build_plugin_node if self.target == "tensorrt" else build_gather_subgraph
            kw = {"position_ids_rank": 3} if self.dep.rope_planes is not None else {}
            sub = build(prefix, h, pos, score, k=st.keep, start=s0, n_visual=n, **kw)
            g.nodes.extend(sub.nodes)
            kept = g.op("Squeeze", [sub.kept, self.ax(g, [0])], name="kept_local")
            o2 = g.op("Gather", [orig, kept], axis=1, name="kept_original")
            if cnt is not None:  # on the full stream's codes, before the gather (as the reference)
                cnt = self.merge_counts(g, cosine, kept, cnt, n, st.keep)
            # The layer's own q/k/v (and cache) are the kept rows of what scoring computed:
            # every op before attention is per token, so gathering equals recomputing.
            T = g.op("Slice", [g.op("Shape", [h]), self.ax(g, [1]), self.ax(g, [2])], name="seq_len")
            rows = g.op("Concat", [
                g.op("Range", [g.const(0, np.int64), g.const(s0, np.int64), g.const(1, np.int64)], name="rows_before"),
                g.op("Add", [kept, g.const(s0, np.int64)], name="rows_kept"),
                g.op("Range", [g.const(s0 + n, np.int64), g.op("Squeeze", [T, self.ax(g, [0])]), g.const(1, np.int64)], name="rows_after"),
            ], axis=0, name="rows")  # fmt: skip
            pick = lambda t, nm: None if t is None else g.op("Gather", [t, rows], axis=2, name=f"reuse_{nm}")  # noqa: E731
            pre = (
                pick(q, "q"), pick(kd, "k"), pick(vd, "v"),
                KVNames(pick(kn.q, "k_q"), pick(kn.scale, "k_scale"), pick(kn.zero, "k_zero")),
                KVNames(pick(vn.q, "v_q"), pick(vn.scale, "v_scale"), pick(vn.zero, "v_zero")),
            )  # fmt: skip
        h2, p2 = sub.hidden, sub.position_ids
        return h2, p2, o2, pre, cnt

    # ------------------------------------------------------------------ graphs
    def kv_outputs(self, g: Graph, prefix: str, l: int, kn: KVNames, vn: KVNames):
        sp = self.spec
        quant = self.cfg.kv_bits < 16
        d = sp.head_dim
        gs = self.cfg.kv_group or d
        dq = d // 2 if self.cfg.kv_bits == 4 else d
        for which, nm in (("key", kn), ("value", vn)):
            seq = f"{prefix}_len_{l}"
            if quant:
                g.output(nm.q, f"{prefix}.{l}.{which}", UINT8, [1, sp.kv_heads, seq, dq])
                g.output(nm.scale, f"{prefix}.{l}.{which}_scale", FLOAT, [1, sp.kv_heads, seq, d // gs])
                g.output(nm.zero, f"{prefix}.{l}.{which}_zero", UINT8, [1, sp.kv_heads, seq, d // gs])
            else:
                g.output(nm.q, f"{prefix}.{l}.{which}", FLOAT, [1, sp.kv_heads, seq, d])

    def final(self, g: Graph, h):
        with g.scope("model"):
            last = g.op("Slice", [h, self.ax(g, [-1]), self.ax(g, [1 << 30]), self.ax(g, [1])], name="last_position")
        hn = self.rmsnorm(g, last, self.dep.norm.numpy(), "model/norm")
        with g.scope("lm_head"):
            lg = g.op("MatMul", [hn, g.init("weight", self.dep.lm_head.T.numpy().astype(np.float32))])
            lg = g.op("Reshape", [lg, g.const([1, self.spec.vocab], np.int64)])
        g.output(lg, "logits", FLOAT, [1, self.spec.vocab])

    def prefill(self, opset: int) -> onnx.ModelProto:
        sp = self.spec
        g = Graph("prefill")
        h = g.input("inputs_embeds", FLOAT, [1, "seq", sp.hidden])
        pos = g.input("position_ids", INT64, self.pos_shape("seq"))
        orig = g.const(np.arange(self.n_visual, dtype=np.int64)[None], np.int64)
        n = self.n_visual
        cos = sin = None
        kept, counts = [], []
        cnt = bias = None  # merged-token counts hp [1,n] and their key bias, from the first stage on
        for l in range(sp.num_layers):
            st = self.dep.stage_at.get(l)
            if st is not None:
                if self.cfg.merge and cnt is None:
                    cnt = self.hc(g, np.ones((1, n)))
                h, pos, orig, pre, cnt = self.stage(g, len(kept), st, l, h, pos, orig, n, cnt, bias)
                kept.append((orig, st.keep))
                if cnt is not None:
                    counts.append((cnt, st.keep))
                    bias = self.key_bias(g, cnt, st.keep, f"model/layers.{l}/prune/key_bias")
                n = st.keep
                cos = None
                q, kd, vd, kn, vn = pre
            else:
                if cos is None:
                    cos, sin = self.rope_tables(g, pos, f"model/layers.{l}/rope")
                _, _, q, k, v = self.qkv(g, l, h, cos, sin)
                kd, vd, kn, vn = self.kv_store(g, l, k, v)
            _, o = self.attend(g, q, kd, vd, 0, f"model/layers.{l}/attn/sdpa", bias)
            h = self.post_attn(g, l, h, o)
            self.kv_outputs(g, "present", l, kn, vn)
        self.final(g, h)
        for i, (o, k) in enumerate(kept):
            g.output(o, f"kept.{i}", INT64, [1, k])
        for i, (c, k) in enumerate(counts):  # integers: exact in fp32
            g.output(self.to_f(g, c), f"merge.{i}", FLOAT, [1, k])
        return g.model(opset)

    def decode(self, opset: int) -> onnx.ModelProto:
        sp = self.spec
        g = Graph("decode")
        h = g.input("inputs_embeds", FLOAT, [1, 1, sp.hidden])
        pos = g.input("position_ids", INT64, self.pos_shape(1))
        quant = self.cfg.kv_bits < 16
        d = sp.head_dim
        gs = self.cfg.kv_group or d
        dq = d // 2 if self.cfg.kv_bits == 4 else d
        past = []
        for l in range(sp.num_layers):
            names = {}
            for which in ("key", "value"):
                seq = f"past_len_{l}"
                if quant:
                    qn = g.input(f"past.{l}.{which}", UINT8, [1, sp.kv_heads, seq, dq])
                    sn = g.input(f"past.{l}.{which}_scale", FLOAT, [1, sp.kv_heads, seq, d // gs])
                    zn = g.input(f"past.{l}.{which}_zero", UINT8, [1, sp.kv_heads, seq, d // gs])
                    names[which] = KVNames(qn, sn, zn)
                else:
                    names[which] = KVNames(g.input(f"past.{l}.{which}", FLOAT, [1, sp.kv_heads, seq, d]))
            past.append(names)
        # merging: each stage's counts (prefill's merge.{s}) -> the key bias of the layers from that
        # stage on (the cached keys are prefill's, so the same bias)
        stages = sorted(self.cfg.stages, key=lambda st: st.layer) if self.cfg.merge else []
        counts = [g.input(f"merge.{i}", FLOAT, [1, st.keep]) for i, st in enumerate(stages)]
        biases = [self.key_bias(g, c, st.keep, f"model/merge.{i}/key_bias")
                  for i, (c, st) in enumerate(zip(counts, stages))]
        cos, sin = self.rope_tables(g, pos, "model/rope")
        for l in range(sp.num_layers):
            bias = next((b for b, st in zip(biases[::-1], stages[::-1]) if st.layer <= l), None)
            _, _, q, k, v = self.qkv(g, l, h, cos, sin)
            kd, vd, kn, vn = self.kv_store(g, l, k, v)
            pk, pv = past[l]["key"], past[l]["value"]
            with g.scope(f"model/layers.{l}/attn/cache"):
                if quant:
                    kall = g.op("Concat", [self.kv_dequant(g, pk, "past_k"), kd], axis=2, name="k_all")
                    vall = g.op("Concat", [self.kv_dequant(g, pv, "past_v"), vd], axis=2, name="v_all")
                    kn = KVNames(*(g.op("Concat", [a, b], axis=2, name=f"present_k{i}") for i, (a, b) in enumerate(zip((pk.q, pk.scale, pk.zero), (kn.q, kn.scale, kn.zero)))))
                    vn = KVNames(*(g.op("Concat", [a, b], axis=2, name=f"present_v{i}") for i, (a, b) in enumerate(zip((pv.q, pv.scale, pv.zero), (vn.q, vn.scale, vn.zero)))))
                else:
                    kall = g.op("Concat", [pk.q, kd], axis=2, name="k_all")
                    vall = g.op("Concat", [pv.q, vd], axis=2, name="v_all")
                    kn, vn = KVNames(kall), KVNames(vall)
            _, o = self.attend(g, q, kall, vall, None, f"model/layers.{l}/attn/sdpa", bias)
            h = self.post_attn(g, l, h, o)
            self.kv_outputs(g, "present", l, kn, vn)
        self.final(g, h)
        return g.model(opset)


def embed_graph(table: np.ndarray, opset: int) -> onnx.ModelProto:
    """token ids [1,T] -> embeddings [1,T,D] (Gather from the embedding table)."""
    g = Graph("embed")
    ids = g.input("input_ids", INT64, [1, "seq"])
    with g.scope("model/embed_tokens"):
        e = g.op("Gather", [g.init("weight", table.astype(np.float32)), ids], axis=0)
    g.output(e, "inputs_embeds", FLOAT, [1, "seq", table.shape[1]])
    return g.model(opset)
