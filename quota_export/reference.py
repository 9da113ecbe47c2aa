"""The deployed model in PyTorch: the single source of truth every artifact is checked against.

It runs the decoder by hand from the HF module weights (not through HF's forward), composing the
primitives of `quota_export/ops/` whose ONNX forms the lowering composes the same way:

    h = embeds                                     # [1, T, D], visual tokens at [s, s+n)
    [rotation: h = h Q, Q = diag(±1) H_D; weights rotated, norm weights folded (quant/hadamard.py)]
    for layer l:
        if a pruning stage sits at l:              # score the n current visual tokens
            s_i = w_m m_i/σ_m + w_a a_i/σ_a - w_r r_i/σ_r + w_d d_i/σ_d   (ops/signals.py)
                  (select: maxmin: the greedy max-min picks as scores, ops/maxmin.py)
            keep = stable top-k (lower index wins ties), ascending        (ops/gather.py)
            h, pos = text ++ h[s + keep] ++ text   # original position ids are kept
            [merge: each dropped token's count goes to its most similar kept token;
             every later attention adds log(count) to that key's logits] (ops/merge.py)
        x  = Q_A(rmsnorm(h));  q, k, v = x W_q, x W_k, x W_v   (W = DQ(Q_W(W)))
        q, k = rope(q, k, pos);  k, v = DQ(Q_KV(k)), DQ(Q_KV(v))   -> this layer's cache
        h += Q_A(softmax(q k^T / sqrt(d) + bias + causal) v) W_o
        x  = Q_A(rmsnorm(h));  h += Q_A(silu(x W_g) * x W_u [H_I with rotation]) W_d
    logits = rmsnorm(h[-1]) W_lm

Precision. Quantized matmuls are exact (integer activations, snapped weight scales; see
quant/quantizers.py). The float work between quantizers whose result depends on summation order
or on a transcendental's last bit (RMSNorm statistics, RoPE tables, attention, SiLU and the
pruning signals) runs in `hp`: float64 with `export.reductions: fp64` (the default; every result
is rounded once to fp32, so torch and ONNX Runtime agree unless a value lands within ~1e-16 of a
rounding boundary), else fp32. A 4-bit quantizer turns a last-bit difference into a whole
quantization step, so this is what makes graphs and reference agree token for token. The
precision is fixed per `Deployed`; `with_reductions` gives another view of the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import MutableMapping
from dataclasses import dataclass, field

import torch

from quota_export import weightcache
from quota_export.models.base import Adapter
from quota_export.ops.attention import Heads, attend
from quota_export.ops.base import hp_dtype
from quota_export.ops.gather import gather_rows, stable_topk
from quota_export.ops.kv_cache import kv_fake
from quota_export.ops.linear import linear, linear_input
from quota_export.ops.maxmin import maxmin_score
from quota_export.ops.merge import key_bias, merge_counts
from quota_export.ops.norm import rmsnorm
from quota_export.ops.rope import rope, rope_freqs
from quota_export.ops.rotate import rotate
from quota_export.ops.signals import Signals, cosine, signals_from, stage_score
from quota_export.ops.swiglu import swiglu
from quota_export.quant.hadamard import RotatedDecoder
from quota_export.quant.quantizers import QWeight
from quota_export.quant.rtn import rtn
from quota_export.recipe import FP, SCHEMES, SIGNALS, ResolvedQuant
from quota_export.weightcache import LayerWeights, PackedCodes, PinnedCache

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class StageCfg:
    """One pruning stage at one visual-token count (recipe.Stage with its keep resolved)."""

    layer: int
    keep: int
    w: tuple[float, float, float, float]  # magnitude, attention, risk, diversity (recipe.SIGNALS)
    sigma: tuple[float, float, float, float]
    select: str = "topk"  # "topk": top-k of the score; "maxmin": greedy max-min selection (ops/maxmin.py)


@dataclass
class DeployConfig:
    """The deployed numerics: the recipe's resolved quantization, its stages at one visual-token
    count, merging and the reductions' precision (`export.reductions`)."""

    quant: ResolvedQuant = field(default_factory=lambda: FP.model_copy(deep=True))
    stages: list[StageCfg] = field(default_factory=list)
    merge: bool = False  # pruning.merge == "proportional" (ops/merge.py)
    fp64: bool = True  # export.reductions == "fp64"
    int_mm: bool = False  # export.matmul == "integer": the onnx target's integer GEMMs (ops/linear.py)

    @classmethod
    def of(cls, scheme: str, **kw) -> DeployConfig:
        """A preset's numerics (recipe.SCHEMES), e.g. DeployConfig.of("w4a4kv4", merge=True)."""
        return cls(quant=SCHEMES[scheme].model_copy(deep=True), **kw)

    @classmethod
    def from_recipe(cls, recipe, n_visual: int | None = None) -> DeployConfig:
        """The recipe's numerics; the stage keeps for images of `n_visual` tokens (default: the
        recipe's own n_visual; other counts scale by the stage fractions, Pruning.keeps_for)."""
        rq = recipe.resolved_quant()
        if recipe.export.matmul == "integer" and rq.weights.accumulation != "exact":
            from quota_export import UserError

            raise UserError("export.matmul: 'integer' needs quant.weights.accumulation: exact (the integer GEMM "
                            "equals the float path only on the exact grid)")
        keeps = recipe.pruning.keeps_for(recipe.pruning.n_visual if n_visual is None else n_visual)
        stages = [StageCfg(s.layer, k, tuple(getattr(s.weights, x) for x in SIGNALS),
                           tuple(getattr(s.sigma, x) for x in SIGNALS), s.select)
                  for s, k in zip(recipe.pruning.stages, keeps)]
        return cls(quant=rq, stages=stages, merge=recipe.pruning.merge == "proportional",
                   fp64=recipe.export.reductions == "fp64", int_mm=recipe.export.matmul == "integer")

    @property
    def weights(self):
        return self.quant.weights

    @property
    def a_bits(self) -> int:
        return self.quant.activations.bits

    @property
    def kv_bits(self) -> int:
        return self.quant.kv_cache.bits

    @property
    def kv_group(self) -> int | None:
        return self.quant.kv_cache.group_size

    @property
    def rotation(self) -> bool:
        """quant.activations.rotation: hadamard (quant/hadamard.py RotatedDecoder, ops/rotate.py)."""
        return self.quant.activations.rotation == "hadamard"


def rtn_weights(adapter: Adapter, cfg: DeployConfig, rot: RotatedDecoder | None = None,
                page_out: bool = False) -> MutableMapping[str, QWeight]:
    """RTN codes of every module the recipe quantizes (4-bit codes stored two per byte,
    weightcache.PackedCodes), of the rotated weights with rotation (`rot`: the model's
    RotatedDecoder if already computed). `page_out`: hand each checkpoint weight's pages back to
    the kernel once its codes exist (weightcache.page_out; the checkpoint is read once)."""
    mods = dict(adapter.model.named_modules())
    if cfg.rotation and rot is None:
        rot = RotatedDecoder(adapter)
    codes = PackedCodes()
    for n in cfg.weights.quantized(list(mods)):
        codes[n] = rtn(float_weight(mods, n, rot), cfg.weights, cfg.a_bits)
        if page_out:
            weightcache.page_out(mods[n].weight.detach())
    return codes


def float_weight(mods: dict, name: str, rot: RotatedDecoder | None) -> torch.Tensor:
    """The fp32 weight the deployed model quantizes for module `name`: rotated, or the checkpoint's."""
    w = None if rot is None else rot.weight(name)
    return mods[name].weight.detach().float() if w is None else w


@dataclass
class QKV:
    """A layer's attention inputs for the rows of h: the normed input, the linears' input (integer
    codes and per-token scale, or the normed input and None), q and k after RoPE, v, and the
    cache's view of k and v (dequantized) with its quantized tensors (q, scale, zp) or None."""

    xn: torch.Tensor
    x: tuple[torch.Tensor, torch.Tensor | None]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_quant: tuple | None
    v_quant: tuple | None

    @property
    def codes(self):
        """What the code cosine reads: the integer codes (the normed input when unquantized)."""
        return self.x[0]

    @property
    def x_dequant(self):
        q, s = self.x
        return q if s is None else q * s

    def rows(self, rows: torch.Tensor) -> QKV:
        """The same tensors for a subset of rows (every op before attention is per token, so
        gathering equals recomputing)."""
        tok = lambda t: None if t is None else t.index_select(1, rows)  # noqa: E731  [1,T,...]
        head = lambda t: None if t is None else t.index_select(2, rows)  # noqa: E731  [1,H,T,...]
        quant = lambda t: None if t is None else tuple(head(x) for x in t)  # noqa: E731
        return QKV(tok(self.xn), (tok(self.x[0]), tok(self.x[1])), head(self.q), head(self.k), head(self.v),
                   head(self.k_cache), head(self.v_cache), quant(self.k_quant), quant(self.v_quant))


@dataclass
class LayerKV:
    """One layer's cache at its quantized width: q uint8 [1,kvh,T,d], scale/zp [1,kvh,T,d/g]."""

    k: torch.Tensor
    v: torch.Tensor
    k_q: tuple | None = None  # (q, scale, zp) when quantized
    v_q: tuple | None = None
    bias: torch.Tensor | None = None  # [T] additive attention-logit bias per cached key (merging)


@dataclass
class PrefillOut:
    logits: torch.Tensor  # [1, V] last position
    cache: list[LayerKV]
    kept: list[torch.Tensor]  # per stage: [1, k] original visual indices, ascending
    scores: list[torch.Tensor | None]  # per stage: [1, n_current] (None with a keep_fn)
    position_ids: torch.Tensor  # [1, T'] after the last stage


def decode_position(p: int, prompt_pos: torch.Tensor) -> torch.Tensor:
    """Position ids of one decode step at position p: [1,1], or [P,1,1] (p in every plane) when the
    prompt's positions are M-RoPE planes [P,1,T]."""
    if prompt_pos.dim() == 3:
        return torch.full((prompt_pos.shape[0], 1, 1), p, dtype=torch.long)
    return torch.tensor([[p]])


class Deployed:
    """Adapter + DeployConfig (+ calibrated weights) -> the deployed forward and generate."""

    def __init__(self, adapter: Adapter, cfg: DeployConfig, qweights: dict[str, QWeight] | None = None):
        self.adapter = adapter
        self.cfg = cfg
        self.spec = sp = adapter.decoder_spec()
        self.heads = Heads(sp.heads, sp.kv_heads, sp.head_dim)
        # rotation: the rotated weights (norm weights folded into the linears that read them; an fp32
        # copy of the decoder, docs/large-models.md)
        self.rot = RotatedDecoder(adapter) if cfg.rotation else None
        self.qweights = rtn_weights(adapter, cfg, self.rot, page_out=True) if qweights is None else qweights
        self._mods = mods = dict(adapter.model.named_modules())
        # fp32 weights made per layer on use (weightcache.py): the checkpoint is held once, in its dtype
        self._cache = PinnedCache()
        self.W: list[LayerWeights] = []
        self.B: list[dict[str, torch.Tensor | None]] = []
        self.quantized: list[dict[str, bool]] = []
        for i in range(sp.num_layers):
            names = {lin: f"{sp.module_prefix}.layers.{i}.{lin}" for lin in LINEARS}
            self.W.append(LayerWeights(names, self.qweights, self.float_weight, lambda n: mods[n].weight, self._cache))
            self.B.append({lin: self._bias(mods[n], n) for lin, n in names.items()})
            self.quantized.append({lin: n in self.qweights for lin, n in names.items()})
        layers = adapter.layers()
        self.ln1 = [layer.input_layernorm.weight.detach().float() for layer in layers]
        self.ln2 = [layer.post_attention_layernorm.weight.detach().float() for layer in layers]
        self.norm = adapter.final_norm().weight.detach().float()
        self._lm_head = None  # an assigned lm_head; else the checkpoint's, upcast on use
        if self.rot is not None:  # the norm weights live in the linears that read the norms
            self.ln1_signal = self.ln1  # the pruning signals' view (signal_qkv)
            self.ln1 = [torch.ones_like(w) for w in self.ln1]
            self.ln2 = [torch.ones_like(w) for w in self.ln2]
            self.norm = torch.ones_like(self.norm)
            self.lm_head = self.rot.weight(self._names[id(adapter.lm_head())])
        self.inv_freq = adapter.inv_freq()
        planes = adapter.rope_planes()
        self.rope_planes = None if planes is None else torch.tensor(planes, dtype=torch.long)
        self.stage_at = {s.layer: s for s in cfg.stages}
        self.hp = hp_dtype(cfg.fp64)

    @property
    def _names(self) -> dict[int, str]:
        return {id(m): n for n, m in self.adapter.model.named_modules()}

    def float_weight(self, name: str) -> torch.Tensor:
        """The unquantized fp32 weight of module `name` as deployed (rotated with rotation)."""
        return float_weight(self._mods, name, self.rot)

    def _bias(self, mod, name: str):
        b = None if self.rot is None else self.rot.bias(name)
        return b if b is not None else None if mod.bias is None else mod.bias.detach().float()

    @property
    def lm_head(self) -> torch.Tensor:
        """fp32 [vocab, hidden]: the checkpoint's, upcast on use (kept while the cache has room)."""
        if self._lm_head is not None:
            return self._lm_head
        w = self.adapter.lm_head().weight
        return self._cache.get("lm_head", lambda: w.detach().float(), w)

    @lm_head.setter
    def lm_head(self, w: torch.Tensor) -> None:
        self._lm_head = w

    def with_reductions(self, fp64: bool) -> Deployed:
        """The same deployed weights with the reductions in float64 (True) or float32."""
        if fp64 == self.cfg.fp64:
            return self
        other = copy.copy(self)
        other.cfg = dataclasses.replace(self.cfg, fp64=fp64)
        other.hp = hp_dtype(fp64)
        return other

    # ------------------------------------------------------------ pieces shared with calibration
    def mm(self, xs, layer: int, lin: str):
        """A linear of `layer` on xs = act(...) (ops/linear.py)."""
        return linear(xs, self.W[layer][lin], self.B[layer][lin])

    def act(self, x, layer: int, lin: str):
        """The input of a linear: (integers, per-token scale) if quantized, else (x, None)."""
        return linear_input(x, self.cfg.a_bits, self.quantized[layer][lin])

    def stream_in(self, h):
        """The decoder's input stream from the embeddings: h, or h Q with rotation (ops/rotate.py)."""
        return h if self.rot is None else rotate(h, self.rot.stream, self.hp)

    def stream(self, prompt):
        """The decoder's input stream of a prompt: `stream_in(embed_prompt(prompt))`."""
        return self.stream_in(self.embed_prompt(prompt))

    def rope_freqs(self, pos):
        return rope_freqs(pos, self.inv_freq, self.rope_planes, self.hp)

    def attend(self, q, k, v, causal_offset: int | None, bias=None):
        return attend(q, k, v, self.heads, self.hp, causal_offset, bias)

    def qkv(self, layer: int, h, pos) -> QKV:
        sp = self.spec
        xn = rmsnorm(h, self.ln1[layer], sp.rms_eps, self.hp)
        B, T, _ = h.shape
        x = self.act(xn, layer, "self_attn.q_proj")
        q = self.mm(x, layer, "self_attn.q_proj").view(B, T, sp.heads, sp.head_dim).transpose(1, 2)
        k = self.mm(x, layer, "self_attn.k_proj").view(B, T, sp.kv_heads, sp.head_dim).transpose(1, 2)
        v = self.mm(x, layer, "self_attn.v_proj").view(B, T, sp.kv_heads, sp.head_dim).transpose(1, 2)
        q = rope(q, pos, self.inv_freq, self.rope_planes, self.hp)
        k = rope(k, pos, self.inv_freq, self.rope_planes, self.hp)
        kc, kq = kv_fake(k, self.cfg.kv_bits, self.cfg.kv_group)
        vc, vq = kv_fake(v, self.cfg.kv_bits, self.cfg.kv_group)
        return QKV(xn, x, q, k, v, kc, vc, kq, vq)

    def mlp(self, layer: int, h):
        x = self.act(rmsnorm(h, self.ln2[layer], self.spec.rms_eps, self.hp), layer, "mlp.gate_proj")
        a = swiglu(self.mm(x, layer, "mlp.gate_proj"), self.mm(x, layer, "mlp.up_proj"), self.hp)
        if self.rot is not None:  # online Hadamard before down_proj's activation quantizer
            a = rotate(a, self.rot.down, self.hp)
        return self.mm(self.act(a, layer, "mlp.down_proj"), layer, "mlp.down_proj")

    def layer(self, layer: int, h, pos, pre: QKV | None = None, bias=None):
        """One decoder layer. `pre`: this layer's QKV for these rows already computed (a pruning
        stage computes it on the full stream and keeps the kept rows, `prune_stage`).
        `bias`: the key bias of merged tokens (ops/merge.py), kept with the layer's cache."""
        sp = self.spec
        a = self.qkv(layer, h, pos) if pre is None else pre
        _, o = self.attend(a.q, a.k_cache, a.v_cache, causal_offset=0, bias=bias)
        B, T = h.shape[:2]
        o = o.transpose(1, 2).reshape(B, T, sp.heads * sp.head_dim)
        h = h + self.mm(self.act(o, layer, "self_attn.o_proj"), layer, "self_attn.o_proj")
        h = h + self.mlp(layer, h)
        return h, LayerKV(a.k_cache, a.v_cache, a.k_quant, a.v_quant, bias)

    def head(self, h):
        """Logits [1, V] of the last position."""
        return rmsnorm(h[:, -1], self.norm, self.spec.rms_eps, self.hp) @ self.lm_head.T

    # ------------------------------------------------------------ scoring
    def signal_qkv(self, layer: int, h, pos) -> QKV:
        """`qkv` as the pruning signals read it. With rotation, the attention input in the
        checkpoint's basis, xn = rmsnorm(h) Q^T * g (the inverse rotation online, ops/rotate.py),
        and its quantizer's codes: the code cosine (diversity, max-min, merging) and the input's
        quantization risk read those, since in the rotated basis (no outlier channels) they are
        other signals and a schedule would not carry over (docs/rotation.md)."""
        a = self.qkv(layer, h, pos)
        if self.rot is None:
            return a
        xn = rotate(a.xn, self.rot.stream.inverted(), self.hp) * self.ln1_signal[layer]
        return dataclasses.replace(a, xn=xn, x=self.act(xn, layer, "self_attn.q_proj"))

    def signals(self, layer: int, h, pos, start: int, n: int, bias=None) -> Signals:
        """The stage signals of the n visual tokens at [start, start+n) (ops/signals.py)."""
        return signals_from(self.signal_qkv(layer, h, pos), h, start, n, self.heads, self.hp, self.cfg.kv_bits < 16,
                            bias)

    def cosine(self, layer: int, h, pos, start: int, n: int):
        """[1,n,n] (hp) code cosine of the visual tokens at this layer (ops/signals.py)."""
        return cosine(self.signal_qkv(layer, h, pos).codes, start, n, self.hp)

    def score(self, stage: StageCfg, layer: int, h, pos, start: int, n: int, bias=None):
        """The stage's score [1, n] (fp32): its weighted signals, or the max-min picks."""
        if stage.select == "maxmin":
            return maxmin_score(self.cosine(layer, h, pos, start, n), stage.keep)
        return stage_score(stage.w, stage.sigma, *self.signals(layer, h, pos, start, n, bias))

    def merge_counts(self, layer: int, h, pos, idx, start: int, n: int, cnt):
        """Counts [k] (float64) of the kept tokens `idx` after a stage (ops/merge.py)."""
        return merge_counts(self.cosine(layer, h, pos, start, n), idx, cnt)

    def key_bias(self, cnt, start: int):
        return key_bias(cnt, start, self.hp)

    def prune_stage(self, layer: int, h, pos, idx, start: int, n: int):
        """Keep the visual rows `idx` [1,k] (ascending) of the span at a stage before `layer` ->
        (h', pos', pre), `pre` = the layer's QKV of the kept rows taken from the full stream's
        pass (the graphs do the same). Text rows are never dropped."""
        a = self.qkv(layer, h, pos)
        h2, pos2, rows = gather_rows(h, pos, idx, start, n)
        return h2, pos2, a.rows(rows)

    # ------------------------------------------------------------ forward / generate
    @torch.no_grad()
    def prefill(self, embeds, pos, start: int, n: int, keep_fn=None) -> PrefillOut:
        """embeds [1,T,D] float, pos [1,T] (or M-RoPE planes [P,1,T]) int64. `keep_fn(stage, layer, h,
        pos, start, n)`, if given, replaces the recipe's scorer (the stage-wise baselines), -> [1,k]."""
        h = self.stream_in(embeds.float())
        orig = torch.arange(n)[None]
        cache, kept, scores = [], [], []
        cnt = bias = None  # merged-token counts [n] and the key bias they give (pruning.merge)
        for layer in range(self.spec.num_layers):
            st = self.stage_at.get(layer)
            pre = None
            if st is not None:
                if keep_fn is not None:
                    idx, s = keep_fn(st, layer, h, pos, start, n), None
                else:
                    s = self.score(st, layer, h, pos, start, n, bias)
                    idx = stable_topk(s, st.keep)
                if self.cfg.merge:
                    cnt = self.merge_counts(layer, h, pos, idx, start, n, torch.ones(n, dtype=torch.float64) if cnt is None else cnt)
                    bias = self.key_bias(cnt, start)
                h, pos, pre = self.prune_stage(layer, h, pos, idx, start, n)
                orig = orig[:, idx[0]]
                kept.append(orig.clone())
                scores.append(s)
                n = st.keep
            h, kv = self.layer(layer, h, pos, pre, bias)
            cache.append(kv)
        return PrefillOut(self.head(h), cache, kept, scores, pos)

    @torch.no_grad()
    def decode(self, emb, pos, cache: list[LayerKV]):
        """One step: emb [1,1,D], pos [1,1] (or [P,1,1] for M-RoPE); appends to each layer's cache in place."""
        sp = self.spec
        h = self.stream_in(emb.float())
        for layer in range(sp.num_layers):
            a = self.qkv(layer, h, pos)
            c = cache[layer]
            c.k = torch.cat([c.k, a.k_cache], dim=2)
            c.v = torch.cat([c.v, a.v_cache], dim=2)
            _, o = self.attend(a.q, c.k, c.v, causal_offset=None, bias=c.bias)
            o = o.transpose(1, 2).reshape(1, 1, sp.heads * sp.head_dim)
            h = h + self.mm(self.act(o, layer, "self_attn.o_proj"), layer, "self_attn.o_proj")
            h = h + self.mlp(layer, h)
        return self.head(h)

    def embed_prompt(self, prompt):
        """Merged embeddings [1,T,D] of a Prompt (vision features scattered into the span)."""
        feats = self.adapter.vision_features(prompt.pixel_values)
        with torch.no_grad():
            emb = self.adapter.embed_tokens()(prompt.input_ids).float()
        emb[:, prompt.visual_start : prompt.visual_start + prompt.n_visual] = feats[0]
        return emb

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int = 8, keep_fn=None, embeds=None):
        """Greedy decode. Returns (token ids, PrefillOut). `embeds` [1,T,D] replaces the merged
        prompt embeddings (parity feeds the decoder the vision graph's own features)."""
        emb = self.embed_prompt(prompt) if embeds is None else embeds.float()
        pos = prompt.positions()  # [1,T], or [P,1,T] planes for M-RoPE
        out = self.prefill(emb, pos, prompt.visual_start, prompt.n_visual, keep_fn=keep_fn)
        toks = []
        logits = out.logits
        next_pos = prompt.first_decode_position()
        emb_layer = self.adapter.embed_tokens()
        for _ in range(max_new_tokens):
            t = int(logits.argmax(-1))
            toks.append(t)
            if t == self.spec.eos_token_id:
                break
            e = emb_layer(torch.tensor([[t]])).float()
            logits = self.decode(e, decode_position(next_pos, pos), out.cache)
            next_pos += 1
        return toks, out
