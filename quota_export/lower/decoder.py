"""Lower the deployed decoder (`reference.Deployed`) into prefill and decode ONNX graphs.

Both compose the same primitives of `quota_export/ops/` (this file the ONNX forms, the reference
the torch forms), so the graphs and the reference agree bit for bit in practice:

    prefill:  inputs_embeds [1,T,D], position_ids [1,T] (M-RoPE: [P,1,T])
              [rotation: -> h Q (ops/rotate.py; the weights are the rotated ones)]
              -> per layer: [stage: score -> TopK(k) -> ascending -> Gather rows/positions
                                    (-> merge counts)]
                            RMSNorm -> Q/DQ(int4, per-token) -> MatMul(DQ(int4 W)) ...
                            [rotation: the online Hadamard before down_proj's Q/DQ]
              -> logits [1,V] (last position), present.{l}.{key,value}[_scale,_zero], kept.{s} [1,k]
                 (+ merge.{s} [1,k] fp32 with pruning.merge: proportional)
    decode:   inputs_embeds [1,1,D], position_ids [1,1], past.{l}.* (lengths differ by layer)
              (+ merge.{s} [1,k]: prefill's, fed unchanged to every step)
              -> logits [1,V], present.{l}.* (past ++ this step, at the quantized width)

The KV cache crosses the graph boundary at its quantized width (ops/kv_cache.py). With merging,
decode rebuilds each stage's key bias from its merge.{s} inputs (the cached keys are prefill's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from quota_export.ops.act_quant import act_quant_onnx, code_zero_point
from quota_export.ops.attention import attend_onnx
from quota_export.ops.base import Emit
from quota_export.ops.gather import build_gather_subgraph, build_plugin_node
from quota_export.ops.graph import FLOAT, INT64, Graph
from quota_export.ops.kv_cache import KVLayout, KVNames, boundary_specs, kv_dequant_onnx, kv_quant_onnx
from quota_export.ops.linear import integer_linear_onnx, integer_plan, linear_onnx, weight_onnx
from quota_export.ops.maxmin import maxmin_score_onnx
from quota_export.ops.merge import key_bias_onnx, merge_counts_onnx
from quota_export.ops.norm import rmsnorm_onnx
from quota_export.ops.rope import rope_onnx, rope_tables_onnx
from quota_export.ops.rotate import rotate_onnx
from quota_export.ops.signals import cosine_onnx, integer_dots_exact_fp32, score_onnx
from quota_export.ops.swiglu import swiglu_onnx
from quota_export.reference import Deployed

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
class QKVNames:
    """A layer's attention inputs in a graph (`reference.QKV`'s ONNX counterpart): the normed input,
    its activation quantizer's (codes, scale) or None, q and k after RoPE, v, the cache's view of
    k and v and the cache tensors at the boundary width."""

    xn: str
    xq: tuple[str, str] | None
    q: str
    k: str | None
    v: str | None
    k_cache: str
    v_cache: str
    kn: KVNames
    vn: KVNames

    @property
    def codes(self):
        return None if self.xq is None else self.xq[0]

    @property
    def scale(self):
        return None if self.xq is None else self.xq[1]


class DecoderLowering:
    def __init__(self, dep: Deployed, n_visual: int, visual_start: int, target: str = "onnx"):
        self.target = target
        self.dep = dep
        self.spec = dep.spec
        self.cfg = dep.cfg
        self.n_visual = n_visual
        self.visual_start = visual_start
        self.fp64 = dep.cfg.fp64
        Emit(Graph("check"), self.fp64, target)  # validates target and precision
        # export.matmul: integer: uint8 activation codes into MatMulInteger (ops/linear.py, the same
        # bits as the float form); the tensorrt target always lowers the float form
        self.integer = target == "onnx" and self.cfg.int_mm and self.cfg.a_bits < 16
        self.kv = KVLayout(self.cfg.kv_bits, self.cfg.kv_group, self.spec.kv_heads, self.spec.head_dim)

    def pos_shape(self, seq):
        planes = self.dep.rope_planes
        return [1, seq] if planes is None else [int(max(planes)) + 1, 1, seq]

    def _emit(self, name: str) -> Emit:
        self._w_cache: dict[str, str] = {}
        return Emit(Graph(name), self.fp64, self.target)

    def _planes(self):
        p = self.dep.rope_planes
        return None if p is None else p.numpy()

    # ------------------------------------------------------------------ layer pieces
    def rope_tables(self, e: Emit, pos, name: str):
        return rope_tables_onnx(e, pos, self.dep.inv_freq.numpy(), self._planes(), name)

    def weight(self, e: Emit, l: int, lin: str):
        key = f"{l}.{lin}"
        if key not in self._w_cache:
            qw = self.dep.qweights.get(f"{self.spec.module_prefix}.layers.{l}.{lin}")
            w_fp = None if qw is not None else self.dep.W[l][lin]  # a quantized linear needs only its codes
            self._w_cache[key] = weight_onnx(e, qw, w_fp, f"model/layers.{l}/{SHORT[lin]}")
        return self._w_cache[key]

    def act_quant(self, e: Emit, x, dim: int, name: str):
        return act_quant_onnx(e, x, self.cfg.a_bits, dim, name, uint8=self.integer)

    def float_codes(self, e: Emit, xq):
        """(codes, scale) with the codes as fp32 integers (export.matmul: integer: uint8 - zero point)."""
        if not self.integer:
            return xq
        key = f"codes:{xq[0]}"
        if key not in self._w_cache:
            f = e.op("Cast", [xq[0]], to=FLOAT, name="codes_float")
            self._w_cache[key] = e.op("Sub", [f, e.const(float(code_zero_point(self.cfg.a_bits)))], name="Integers")
        return self._w_cache[key], xq[1]

    def linear(self, e: Emit, x, l: int, lin: str, x_q=None):
        """A linear of layer l on x; `x_q` reuses an already quantized input (codes, scale)."""
        quant = self.dep.quantized[l][lin] and self.cfg.a_bits < 16
        if quant and x_q is None:
            x_q = self.act_quant(e, x, self.dep.W[l].in_features(lin), f"model/layers.{l}/{SHORT[lin]}/input_quant")
        scope = f"model/layers.{l}/{SHORT[lin]}"
        if quant and self.integer:
            qw = self.dep.qweights[f"{self.spec.module_prefix}.layers.{l}.{lin}"]
            plan = integer_plan(qw, self.cfg.a_bits)
            if plan is not None:
                return integer_linear_onnx(e, x_q[0], qw, plan, self.cfg.a_bits, x_q[1], self.dep.B[l][lin], scope)
            x_q = self.float_codes(e, x_q)
        w = self.weight(e, l, lin)
        return linear_onnx(e, x_q[0] if quant else x, w, x_q[1] if quant else None, self.dep.B[l][lin], scope)

    def heads(self, e: Emit, x, n_heads: int, name: str):
        """[1,T,n*d] -> [1,n,T,d]"""
        with e.scope(name):
            r = e.op("Reshape", [x, e.const([1, -1, n_heads, self.spec.head_dim], np.int64)])
            return e.op("Transpose", [r], perm=[0, 2, 1, 3])

    def block_input(self, e: Emit, h, l: int, norm: str, block: str, first: str):
        """A block's normed input and, if its first linear's activations are quantized, the
        (codes, scale) every linear of the block shares."""
        xn = rmsnorm_onnx(e, h, getattr(self.dep, "ln1" if norm == "input_layernorm" else "ln2")[l].numpy(),
                          self.spec.rms_eps, f"model/layers.{l}/{norm}")
        xq = None
        if self.dep.quantized[l][first] and self.cfg.a_bits < 16:
            xq = self.act_quant(e, xn, self.spec.hidden, f"model/layers.{l}/{block}/input_quant")
        return xn, xq

    def qkv(self, e: Emit, l: int, h, cos, sin, kv_scope: str | None = None) -> QKVNames:
        """The layer's attention inputs; the cache quantizers are emitted under `kv_scope` (a
        pruning stage's scope) when given."""
        sp = self.spec
        xn, xq = self.block_input(e, h, l, "input_layernorm", "attn", "self_attn.q_proj")
        q = self.linear(e, xn, l, "self_attn.q_proj", xq)
        k = self.linear(e, xn, l, "self_attn.k_proj", xq)
        v = self.linear(e, xn, l, "self_attn.v_proj", xq)
        q = rope_onnx(e, self.heads(e, q, sp.heads, f"model/layers.{l}/attn/q_heads"), cos, sin, sp.head_dim, f"model/layers.{l}/attn/q_rope")
        k = rope_onnx(e, self.heads(e, k, sp.kv_heads, f"model/layers.{l}/attn/k_heads"), cos, sin, sp.head_dim, f"model/layers.{l}/attn/k_rope")
        v = self.heads(e, v, sp.kv_heads, f"model/layers.{l}/attn/v_heads")
        if kv_scope is None:
            kc, vc, kn, vn = self.kv_store(e, l, k, v)
        else:
            with e.scope(kv_scope):
                kc, vc, kn, vn = self.kv_store(e, l, k, v)
        return QKVNames(xn, xq, q, k, v, kc, vc, kn, vn)

    def kv_store(self, e: Emit, l: int, k, v):
        if self.cfg.kv_bits >= 16:
            return k, v, KVNames(k), KVNames(v)
        kd, kn = kv_quant_onnx(e, k, self.kv, f"model/layers.{l}/attn/k_cache_quant")
        vd, vn = kv_quant_onnx(e, v, self.kv, f"model/layers.{l}/attn/v_cache_quant")
        return kd, vd, kn, vn

    def attend(self, e: Emit, q, k, v, offset, name: str, bias=None):
        """The layer's attention output (the probabilities are not needed: attend_onnx's fast form)."""
        return attend_onnx(e, q, k, v, self.dep.heads, offset, name, bias, probs=False)[1]

    def post_attn(self, e: Emit, l: int, h, o):
        sp = self.spec
        with e.scope(f"model/layers.{l}/attn"):
            o = e.op("Reshape", [e.op("Transpose", [o], perm=[0, 2, 1, 3]), e.const([1, -1, sp.heads * sp.head_dim], np.int64)], name="merge_heads")
        h = e.op("Add", [h, self.linear(e, o, l, "self_attn.o_proj")], name=f"model/layers.{l}/attn/residual")
        xn, xq = self.block_input(e, h, l, "post_attention_layernorm", "mlp", "mlp.gate_proj")
        gt = self.linear(e, xn, l, "mlp.gate_proj", xq)
        up = self.linear(e, xn, l, "mlp.up_proj", xq)
        a = swiglu_onnx(e, gt, up, f"model/layers.{l}/mlp")
        if self.dep.rot is not None:  # rotation: online Hadamard before down_proj's quantizer
            a = rotate_onnx(e, a, self.dep.rot.down, f"model/layers.{l}/mlp/down_proj/hadamard")
        down = self.linear(e, a, l, "mlp.down_proj")
        return e.op("Add", [h, down], name=f"model/layers.{l}/mlp/residual")

    def stream_in(self, e: Emit, h):
        """The decoder's input stream (reference.Deployed.stream_in): h, or h Q with rotation."""
        return h if self.dep.rot is None else rotate_onnx(e, h, self.dep.rot.stream, "model/rotate_input")

    def signal_view(self, e: Emit, l: int, a: QKVNames, scope: str):
        """With rotation, (xn, codes) as the pruning signals read them (`Deployed.signal_qkv`): the
        attention input back in the checkpoint's basis, rmsnorm(h) Q^T * g, and its quantizer."""
        if self.dep.rot is None:
            return None
        xn = rotate_onnx(e, a.xn, self.dep.rot.stream.inverted(), f"{scope}/signal_basis")
        with e.scope(f"{scope}/signal_basis"):
            xn = e.op("Mul", [e.init("norm_weight", self.dep.ln1_signal[l].numpy().astype(np.float32)), xn])
        if a.xq is None:
            return xn, None
        return xn, act_quant_onnx(e, xn, self.cfg.a_bits, self.spec.hidden, f"{scope}/signal_basis/input_quant")

    def key_bias(self, e: Emit, cnt, k: int, name: str):
        return key_bias_onnx(e, cnt, k, self.visual_start, self.n_visual, name)

    # ------------------------------------------------------------------ a pruning stage
    def stage(self, e: Emit, st, l: int, h, pos, orig, n: int, cnt=None, bias=None):
        """Score the n visual tokens at [start, start+n), keep the top st.keep (ascending).

            h ─┬─ signals(magnitude, attention, risk, diversity) ─ weighted sum = scores [1,n]
               │   (select: maxmin: the unrolled greedy max-min picks as scores)
               │   TopK(k, largest, sorted: lower index wins ties) -> idx -> TopK(idx, smallest) = ascending
               └─ Concat(h[:, :s], Gather(h[:, s:s+n], idx), h[:, s+n:])   (same for position ids)

        -> (h', pos', kept original indices, the layer's QKVNames of the kept rows, counts).
        Merging: `cnt` hp [1,n] = the counts so far (ones at the first stage), `bias` the key bias
        of the previous stage (the scoring attention sees it); the new counts [1,k] come back.
        """
        s0 = self.visual_start
        scope = f"model/layers.{l}/prune"
        with e.scope(scope):
            cos, sin = self.rope_tables(e, pos, "rope")
        a = self.qkv(e, l, h, cos, sin, kv_scope=scope)
        sig = self.signal_view(e, l, a, scope)
        with e.scope(scope):
            if a.xq is not None:
                a = replace(a, xq=self.float_codes(e, a.xq))
            if sig is not None:
                a = replace(a, xn=sig[0], xq=sig[1])
            # cosine of the attention input's integer codes (else the normed input): the
            # diversity signal, max-min selection and merging read it
            cosine = cosine_onnx(e, a.xn if a.xq is None else a.xq[0], s0, n,
                                 a.xq is not None and integer_dots_exact_fp32(self.cfg.a_bits, self.spec.hidden))
            if st.select == "maxmin":
                score = maxmin_score_onnx(e, cosine, n, st.keep)
            else:
                score = score_onnx(e, st.w, st.sigma, a, h, cosine, s0, n, self.dep.heads, self.cfg.kv_bits < 16, bias)
            build = build_plugin_node if self.target == "tensorrt" else build_gather_subgraph
            kw = {"position_ids_rank": 3} if self.dep.rope_planes is not None else {}
            sub = build(f"/{scope}/gather", h, pos, score, k=st.keep, start=s0, n_visual=n, **kw)
            e.g.nodes.extend(sub.nodes)
            kept = e.op("Squeeze", [sub.kept, e.ax([0])], name="kept_local")
            o2 = e.op("Gather", [orig, kept], axis=1, name="kept_original")
            if cnt is not None:  # on the full stream's codes, before the gather (as the reference)
                cnt = merge_counts_onnx(e, cosine, kept, cnt, st.keep)
            # The layer's own q/k/v (and cache) are the kept rows of what scoring computed:
            # every op before attention is per token, so gathering equals recomputing.
            T = e.op("Slice", [e.op("Shape", [h]), e.ax([1]), e.ax([2])], name="seq_len")
            rows = e.op("Concat", [
                e.op("Range", [e.const(0, np.int64), e.const(s0, np.int64), e.const(1, np.int64)], name="rows_before"),
                e.op("Add", [kept, e.const(s0, np.int64)], name="rows_kept"),
                e.op("Range", [e.const(s0 + n, np.int64), e.op("Squeeze", [T, e.ax([0])]), e.const(1, np.int64)], name="rows_after"),
            ], axis=0, name="rows")  # fmt: skip
            pick = lambda t, nm: None if t is None else e.op("Gather", [t, rows], axis=2, name=f"reuse_{nm}")  # noqa: E731
            pre = QKVNames(
                None, None, pick(a.q, "q"), None, None, pick(a.k_cache, "k"), pick(a.v_cache, "v"),
                KVNames(pick(a.kn.q, "k_q"), pick(a.kn.scale, "k_scale"), pick(a.kn.zero, "k_zero")),
                KVNames(pick(a.vn.q, "v_q"), pick(a.vn.scale, "v_scale"), pick(a.vn.zero, "v_zero")),
            )  # fmt: skip
        return sub.hidden, sub.position_ids, o2, pre, cnt

    # ------------------------------------------------------------------ graphs
    def kv_outputs(self, e: Emit, prefix: str, l: int, kn: KVNames, vn: KVNames):
        for which, nm in (("key", kn), ("value", vn)):
            for (suffix, dt, shape), t in zip(boundary_specs(self.kv, f"{prefix}_len_{l}"), (nm.q, nm.scale, nm.zero)):
                e.g.output(t, f"{prefix}.{l}.{which}{suffix}", dt, shape)

    def final(self, e: Emit, h):
        with e.scope("model"):
            last = e.op("Slice", [h, e.ax([-1]), e.ax([1 << 30]), e.ax([1])], name="last_position")
        hn = rmsnorm_onnx(e, last, self.dep.norm.numpy(), self.spec.rms_eps, "model/norm")
        with e.scope("lm_head"):
            lg = e.op("MatMul", [hn, e.init("weight", self.dep.lm_head.T.numpy().astype(np.float32))])
            lg = e.op("Reshape", [lg, e.const([1, self.spec.vocab], np.int64)])
        e.g.output(lg, "logits", FLOAT, [1, self.spec.vocab])

    def prefill(self, opset: int) -> onnx.ModelProto:
        sp = self.spec
        e = self._emit("prefill")
        h = self.stream_in(e, e.g.input("inputs_embeds", FLOAT, [1, "seq", sp.hidden]))
        pos = e.g.input("position_ids", INT64, self.pos_shape("seq"))
        orig = e.const(np.arange(self.n_visual, dtype=np.int64)[None], np.int64)
        n = self.n_visual
        cos = sin = None
        kept, counts = [], []
        cnt = bias = None  # merged-token counts hp [1,n] and their key bias, from the first stage on
        for l in range(sp.num_layers):
            st = self.dep.stage_at.get(l)
            if st is not None:
                if self.cfg.merge and cnt is None:
                    cnt = e.hc(np.ones((1, n)))
                h, pos, orig, a, cnt = self.stage(e, st, l, h, pos, orig, n, cnt, bias)
                kept.append((orig, st.keep))
                if cnt is not None:
                    counts.append((cnt, st.keep))
                    bias = self.key_bias(e, cnt, st.keep, f"model/layers.{l}/prune/key_bias")
                n = st.keep
                cos = None
            else:
                if cos is None:
                    cos, sin = self.rope_tables(e, pos, f"model/layers.{l}/rope")
                a = self.qkv(e, l, h, cos, sin)
            o = self.attend(e, a.q, a.k_cache, a.v_cache, 0, f"model/layers.{l}/attn/sdpa", bias)
            h = self.post_attn(e, l, h, o)
            self.kv_outputs(e, "present", l, a.kn, a.vn)
        self.final(e, h)
        for i, (o, k) in enumerate(kept):
            e.g.output(o, f"kept.{i}", INT64, [1, k])
        for i, (c, k) in enumerate(counts):  # integers: exact in fp32
            e.g.output(e.to_f(c), f"merge.{i}", FLOAT, [1, k])
        return e.g.model(opset)

    def decode(self, opset: int) -> onnx.ModelProto:
        sp = self.spec
        e = self._emit("decode")
        h = self.stream_in(e, e.g.input("inputs_embeds", FLOAT, [1, 1, sp.hidden]))
        pos = e.g.input("position_ids", INT64, self.pos_shape(1))
        quant = self.cfg.kv_bits < 16
        past = []
        for l in range(sp.num_layers):
            names = {}
            for which in ("key", "value"):
                names[which] = KVNames(*(e.g.input(f"past.{l}.{which}{suffix}", dt, shape)
                                         for suffix, dt, shape in boundary_specs(self.kv, f"past_len_{l}")))
            past.append(names)
        # merging: each stage's counts (prefill's merge.{s}) -> the key bias of the layers from that
        # stage on (the cached keys are prefill's, so the same bias)
        stages = sorted(self.cfg.stages, key=lambda st: st.layer) if self.cfg.merge else []
        counts = [e.g.input(f"merge.{i}", FLOAT, [1, st.keep]) for i, st in enumerate(stages)]
        biases = [self.key_bias(e, c, st.keep, f"model/merge.{i}/key_bias")
                  for i, (c, st) in enumerate(zip(counts, stages))]
        cos, sin = self.rope_tables(e, pos, "model/rope")
        for l in range(sp.num_layers):
            bias = next((b for b, st in zip(biases[::-1], stages[::-1]) if st.layer <= l), None)
            a = self.qkv(e, l, h, cos, sin)
            kd, vd, kn, vn = a.k_cache, a.v_cache, a.kn, a.vn
            pk, pv = past[l]["key"], past[l]["value"]
            with e.scope(f"model/layers.{l}/attn/cache"):
                if quant:
                    kn = KVNames(*(e.op("Concat", [p, c], axis=2, name=f"present_k{i}")
                                   for i, (p, c) in enumerate(zip((pk.q, pk.scale, pk.zero), (kn.q, kn.scale, kn.zero)))))
                    vn = KVNames(*(e.op("Concat", [p, c], axis=2, name=f"present_v{i}")
                                   for i, (p, c) in enumerate(zip((pv.q, pv.scale, pv.zero), (vn.q, vn.scale, vn.zero)))))
                    # the whole cache read back from present (past ++ this step at the boundary width): this
                    # step's rows dequantize to exactly kd / vd, and one fp32 Concat per step is saved
                    kall = kv_dequant_onnx(e, kn, self.kv, "k_all")
                    vall = kv_dequant_onnx(e, vn, self.kv, "v_all")
                else:
                    kall = e.op("Concat", [pk.q, kd], axis=2, name="k_all")
                    vall = e.op("Concat", [pv.q, vd], axis=2, name="v_all")
                    kn, vn = KVNames(kall), KVNames(vall)
            o = self.attend(e, a.q, kall, vall, None, f"model/layers.{l}/attn/sdpa", bias)
            h = self.post_attn(e, l, h, o)
            self.kv_outputs(e, "present", l, kn, vn)
        self.final(e, h)
        return e.g.model(opset)


def embed_graph(table: np.ndarray, opset: int) -> onnx.ModelProto:
    """token ids [1,T] -> embeddings [1,T,D] (Gather from the embedding table)."""
    g = Graph("embed")
    ids = g.input("input_ids", INT64, [1, "seq"])
    with g.scope("model/embed_tokens"):
        e = g.op("Gather", [g.init("weight", table.astype(np.float32)), ids], axis=0)
    g.output(e, "inputs_embeds", FLOAT, [1, "seq", table.shape[1]])
    return g.model(opset)
