"""The deployed model in PyTorch: fake-quant + pruning exactly as the graphs compute them.

This is the single source of truth every artifact is checked against. It runs the decoder by
hand from the HF module weights (not through HF's forward) so that each op matches a graph op:

    h = embeds                                     # [1, T, D], visual tokens at [s, s+n)
    for layer l:
        if a pruning stage sits at l:              # score the n current visual tokens
            s_i = w_m m_i/σ_m + w_a a_i/σ_a - w_r r_i/σ_r
            keep = stable top-k (lower index wins ties), ascending
            h, pos = text ++ h[s + keep] ++ text   # original position ids are kept
            [merge: each dropped token's count goes to its most similar kept token;
             every later attention adds log(count) to that key's logits]
        x  = Q_A(rmsnorm(h));  q, k, v = x W_q, x W_k, x W_v   (W = DQ(Q_W(W)))
        q, k = rope(q, k, pos);  k, v = DQ(Q_KV(k)), DQ(Q_KV(v))   -> this layer's cache
        h += Q_A(softmax(q k^T / sqrt(d) + bias + causal) v) W_o
        x  = Q_A(rmsnorm(h));  h += Q_A(silu(x W_g) * x W_u) W_d
    logits = rmsnorm(h[-1]) W_lm
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from quota_export.models.base import Adapter
from quota_export.prune.topk import stable_topk
from quota_export.quant.quantizers import (
    QWeight,
    exact_scale_bits,
    quant_act,
    kv_dequantize,
    kv_quantize,
    quantize_weight,
)
from quota_export.recipe import SIGNALS

SCORE_GRID_BITS = 10  # scores are compared at a resolution of 2^-10 (recipe sigmas make them O(1))

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class StageCfg:
    layer: int
    keep: int
    w: tuple[float, float, float, float]  # magnitude, attention, risk, diversity
    sigma: tuple[float, float, float, float]
    select: str = "topk"  # "topk": top-k of the score; "maxmin": greedy max-min diversity (Deployed.maxmin_score)


@dataclass
class DeployConfig:
    """The numerics of a recipe, flattened for the reference and the lowering."""

    w_bits: int = 16
    w_symmetric: bool = True
    w_group: int | None = 32  # None = per channel
    w_algorithm: str = "rtn"
    targets: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    exact_acc: bool = True  # weights.accumulation == "exact" (see quant/quantizers.py)
    a_bits: int = 16
    kv_bits: int = 16
    kv_group: int | None = None  # None = head_dim
    stages: list[StageCfg] = field(default_factory=list)
    merge: bool = False  # pruning.merge == "proportional" (see Deployed.merge_counts)
    fp64: bool = True  # export.reductions == "fp64" (see `Deployed`)
    int_mm: bool = False  # export.matmul == "integer": the onnx target's integer GEMMs (lower/intlinear.py)

    @classmethod
    def from_recipe(cls, recipe, n_visual: int | None = None) -> "DeployConfig":
        """The recipe's numerics; the stage keeps for images of `n_visual` tokens (default: the
        recipe's own n_visual; other counts scale by the stage fractions, Pruning.keeps_for)."""
        rq = recipe.resolved_quant()
        keeps = recipe.pruning.keeps_for(recipe.pruning.n_visual if n_visual is None else n_visual)
        w, a, kv = rq.weights, rq.activations, rq.kv_cache
        if a.bits < 16 and a.granularity != "token":
            from quota_export import UserError

            raise UserError("quant.activations.granularity: only 'token' (dynamic per-token) is implemented")
        if a.rotation != "none":
            from quota_export import UserError

            raise UserError("quant.activations.rotation: 'hadamard' is not lowered yet; use 'none'")
        if recipe.export.matmul == "integer" and w.accumulation != "exact":
            from quota_export import UserError

            raise UserError("export.matmul: 'integer' needs quant.weights.accumulation: exact (the integer GEMM "
                            "equals the float path only on the exact grid)")
        return cls(
            w_bits=w.bits,
            w_symmetric=w.symmetric,
            w_group=w.group_size if w.granularity == "group" else None,
            w_algorithm=w.algorithm,
            exact_acc=w.accumulation == "exact",
            targets=list(w.targets),
            ignore=list(w.ignore),
            a_bits=a.bits,
            kv_bits=kv.bits,
            kv_group=kv.group_size,
            fp64=recipe.export.reductions == "fp64",
            int_mm=recipe.export.matmul == "integer",
            merge=recipe.pruning.merge == "proportional",
            stages=[
                StageCfg(
                    s.layer,
                    k,
                    tuple(getattr(s.weights, x) for x in SIGNALS),
                    tuple(getattr(s.sigma, x) for x in SIGNALS),
                    s.select,
                )
                for s, k in zip(recipe.pruning.stages, keeps)
            ],
        )


    def scale_bits(self, in_features: int) -> int | None:
        """Bits of the snapped weight scales for a layer this wide (None: free fp32 scales)."""
        if not self.exact_acc or self.a_bits >= 16 or self.w_bits >= 16:
            return None
        return exact_scale_bits(in_features, self.w_bits, self.w_symmetric, self.a_bits)


def quantized_module_names(names: list[str], cfg: DeployConfig) -> list[str]:
    if cfg.w_bits >= 16:
        return []
    out = []
    for n in names:
        if any(re.search(p, n) for p in cfg.targets) and not any(re.search(p, n) for p in cfg.ignore):
            out.append(n)
    return out


def rtn_weights(adapter: Adapter, cfg: DeployConfig) -> dict[str, QWeight]:
    mods = dict(adapter.model.named_modules())
    res = {}
    for n in quantized_module_names(list(mods), cfg):
        w = mods[n].weight.detach().float()
        k = w.shape[1]
        res[n] = quantize_weight(w, cfg.w_bits, cfg.w_symmetric, cfg.w_group or k, scale_bits=cfg.scale_bits(k))
    return res


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
    scores: list[torch.Tensor]  # per stage: [1, n_current]
    position_ids: torch.Tensor  # [1, T'] after the last stage


def decode_position(p: int, prompt_pos: torch.Tensor) -> torch.Tensor:
    """Position ids of one decode step at position p: [1,1], or [P,1,1] (p in every plane) when the
    prompt's positions are M-RoPE planes [P,1,T]."""
    if prompt_pos.dim() == 3:
        return torch.full((prompt_pos.shape[0], 1, 1), p, dtype=torch.long)
    return torch.tensor([[p]])


def stage_score(stage: StageCfg, mag, att, risk, div):
    """s = w_m m/σ_m + w_a a/σ_a - w_r r/σ_r + w_d d/σ_d, on a grid of 2^-SCORE_GRID_BITS.

    Tokens closer than the grid tie exactly and the lower index wins, so float noise (different
    summation orders in the graphs) cannot reorder near-identical tokens (e.g. background
    patches); only a token sitting on a grid boundary can move. Multiplying by 2^b is exact."""
    (wm, wa, wr, wd), (sm, sa, sr, sd) = stage.w, stage.sigma
    s = (wm / sm) * mag + (wa / sa) * att - (wr / sr) * risk + (wd / sd) * div
    return torch.round(s * float(2**SCORE_GRID_BITS)).float()


def rmsnorm(x, weight, eps, hp=torch.float32):
    """weight * (x * r), r = 1 / sqrt(mean(x^2) + eps) computed in `hp` and rounded to fp32."""
    xh = x.to(hp)
    r = 1.0 / torch.sqrt((xh * xh).mean(-1, keepdim=True) + eps)
    return weight * (x * r.float())


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Deployed:
    """Adapter + DeployConfig (+ calibrated weights) -> the deployed forward and generate.

    Precision. Quantized matmuls are exact (integer activations, snapped weight scales; see
    quant/quantizers.py). The float work between quantizers whose result depends on summation
    order or on a transcendental's last bit — RMSNorm statistics, RoPE tables, attention
    (scores, softmax, weighted sum), SiLU and the pruning signals — runs in `hp`: float64 with
    `export.reductions: fp64` (the default; every result is rounded once to fp32, so torch and
    ONNX Runtime agree unless a value lands within ~1e-16 of a rounding boundary), else fp32.
    A 4-bit quantizer turns a last-bit difference into a whole quantization step, so this is what
    makes graphs and reference agree token for token."""

    def __init__(self, adapter: Adapter, cfg: DeployConfig, qweights: dict[str, QWeight] | None = None):
        self.adapter = adapter
        self.cfg = cfg
        self.spec = adapter.decoder_spec()
        self.qweights = rtn_weights(adapter, cfg) if qweights is None else qweights
        mods = dict(adapter.model.named_modules())
        pre = self.spec.module_prefix
        self.W: list[dict[str, torch.Tensor]] = []
        self.quantized: list[dict[str, bool]] = []
        for i in range(self.spec.num_layers):
            d, qd = {}, {}
            for lin in LINEARS:
                name = f"{pre}.layers.{i}.{lin}"
                qw = self.qweights.get(name)
                d[lin] = qw.dequant() if qw is not None else mods[name].weight.detach().float()
                qd[lin] = qw is not None
            self.W.append(d)
            self.quantized.append(qd)
        layers = adapter.layers()
        self.ln1 = [l.input_layernorm.weight.detach().float() for l in layers]
        self.ln2 = [l.post_attention_layernorm.weight.detach().float() for l in layers]
        self.norm = adapter.final_norm().weight.detach().float()
        self.lm_head = adapter.lm_head().weight.detach().float()
        self.inv_freq = adapter.inv_freq()
        planes = adapter.rope_planes()
        self.rope_planes = None if planes is None else torch.tensor(planes, dtype=torch.long)
        self.B: list[dict[str, torch.Tensor | None]] = [
            {
                lin: (None if mods[f"{pre}.layers.{i}.{lin}"].bias is None else mods[f"{pre}.layers.{i}.{lin}"].bias.detach().float())
                for lin in LINEARS
            }
            for i in range(self.spec.num_layers)
        ]
        self.stage_at = {s.layer: s for s in cfg.stages}
        self.hp = torch.float64 if cfg.fp64 else torch.float32

    def set_reductions(self, fp64: bool) -> None:
        """Switch the precision of the order-sensitive reductions (see the class doc)."""
        self.cfg.fp64 = fp64
        self.hp = torch.float64 if fp64 else torch.float32

    # ------------------------------------------------------------ pieces shared with calibration
    def mm(self, xs, layer: int, lin: str):
        """(q @ W^T) * s (+ bias) for `xs` = act(...) = (q, s): integer activations times the
        deployed weight, then the per-token scale — the order the graphs compute it in (with
        exact accumulation the product is exact, see quant/quantizers.py)."""
        x, s = xs
        y = x @ self.W[layer][lin].T
        if s is not None:
            y = y * s
        b = self.B[layer][lin]
        return y if b is None else y + b

    def act(self, x, layer: int, lin: str):
        """The input of a linear: (integers, per-token scale) if quantized, else (x, None)."""
        if self.cfg.a_bits < 16 and self.quantized[layer][lin]:
            return quant_act(x, self.cfg.a_bits)
        return x, None

    def rope_freqs(self, pos):
        """pos [1,T] (1-D RoPE) or [P,1,T] (M-RoPE planes) -> angles [1,T,d/2].

        With planes, frequency f uses the position of plane `rope_planes[f]` (adapter-given)."""
        inv = self.inv_freq.to(self.hp)
        if pos.dim() == 3:
            sel = pos[self.rope_planes]  # [d/2, 1, T]
            return sel.permute(1, 2, 0).to(self.hp) * inv
        return pos[..., None].to(self.hp) * inv

    def rope(self, x, pos):
        freqs = self.rope_freqs(pos)  # [1, T, d/2] in hp
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().float()[:, None], emb.sin().float()[:, None]  # [1, 1, T, d]
        return x * cos + rotate_half(x) * sin

    def kv(self, x):
        """Fake-quantize a key/value tensor [1, kvh, T, d]; returns (x', (q, scale, zp) | None)."""
        if self.cfg.kv_bits >= 16:
            return x, None
        g = self.cfg.kv_group or x.shape[-1]
        q, s, z = kv_quantize(x, self.cfg.kv_bits, g)
        return kv_dequantize(q, s, z, g), (q, s, z)

    def qkv(self, layer: int, h, pos):
        """(normed+quantized input x, q, k', v', k fp, v fp, k quant, v quant)."""
        sp = self.spec
        W = self.W[layer]
        xn = rmsnorm(h, self.ln1[layer], sp.rms_eps, self.hp)
        B, T, _ = h.shape
        x = self.act(xn, layer, "self_attn.q_proj")
        q = self.mm(x, layer, "self_attn.q_proj").view(B, T, sp.heads, sp.head_dim).transpose(1, 2)
        k = self.mm(x, layer, "self_attn.k_proj").view(B, T, sp.kv_heads, sp.head_dim).transpose(1, 2)
        v = self.mm(x, layer, "self_attn.v_proj").view(B, T, sp.kv_heads, sp.head_dim).transpose(1, 2)
        q, k = self.rope(q, pos), self.rope(k, pos)
        kd, kq = self.kv(k)
        vd, vq = self.kv(v)
        return xn, x, q, kd, vd, k, v, kq, vq

    def attend(self, q, k, v, causal_offset: int | None, bias=None):
        """q [1,H,Tq,d], k/v [1,kvh,Tk,d] -> probs [1,H,Tq,Tk] (hp), out [1,H,Tq,d] (fp32).
        `bias` [T0] (hp, T0 <= Tk) is added to the scores of the first T0 keys (`key_bias`)."""
        q, k, v = q.to(self.hp), k.to(self.hp), v.to(self.hp)
        rep = self.spec.heads // self.spec.kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        s = (q @ k.transpose(-1, -2)) * (self.spec.head_dim**-0.5)
        if bias is not None:
            s = torch.cat([s[..., : bias.numel()] + bias, s[..., bias.numel() :]], dim=-1)
        if causal_offset is not None:
            Tq, Tk = s.shape[-2], s.shape[-1]
            i = torch.arange(Tq)[:, None] + causal_offset
            j = torch.arange(Tk)[None, :]
            s = s.masked_fill(j > i, float("-inf"))
        p = torch.softmax(s, dim=-1)
        return p, (p @ v).float()

    def mlp(self, layer: int, h):
        W = self.W[layer]
        x = self.act(rmsnorm(h, self.ln2[layer], self.spec.rms_eps, self.hp), layer, "mlp.gate_proj")
        g = self.mm(x, layer, "mlp.gate_proj")
        u = self.mm(x, layer, "mlp.up_proj")
        gh = g.to(self.hp)
        a = (gh * torch.sigmoid(gh)).float() * u
        return self.mm(self.act(a, layer, "mlp.down_proj"), layer, "mlp.down_proj")

    def layer(self, layer: int, h, pos, pre=None, bias=None):
        """One decoder layer. `pre` = (q, k', v', k quant, v quant) already computed for these rows
        (a pruning stage computes them on the full stream and gathers the kept rows: every op
        before attention is per token, so this equals recomputing them, and costs nothing).
        `bias`: the key bias of merged tokens (`key_bias`), kept with the layer's cache."""
        sp = self.spec
        if pre is None:
            _, _, q, kd, vd, _, _, kq, vq = self.qkv(layer, h, pos)
        else:
            q, kd, vd, kq, vq = pre
        _, o = self.attend(q, kd, vd, causal_offset=0, bias=bias)
        B, T = h.shape[:2]
        o = o.transpose(1, 2).reshape(B, T, sp.heads * sp.head_dim)
        h = h + self.mm(self.act(o, layer, "self_attn.o_proj"), layer, "self_attn.o_proj")
        h = h + self.mlp(layer, h)
        return h, LayerKV(kd, vd, kq, vq, bias)

    # ------------------------------------------------------------ scoring
    def signals(self, layer: int, h, pos, start: int, n: int, bias=None):
        """Per visual token [1, n] each: magnitude, attention from the text after the span, low-bit
        risk, diversity (DESIGN §4).

        diversity d_i = 1 - max_{j<i} cos(x_i, x_j) over the visual tokens present before it (in
        their original order), x = the attention block's input as the deployed model sees it: the
        integer codes of its low-bit activation quantizer (else the normed input). The first
        token, with nothing before it, gets 2. A token that repeats an earlier one scores 0: among
        near-duplicates (e.g. background patches) the first is kept and the rest are cheap to
        drop, which is what the max-min selection of DivPrune achieves greedily, here as a static
        per-token score. cos = (x_i . x_j) / |x_i| / |x_j|: on integer codes every dot product
        is an exact integer (4-bit codes: below 2^24 up to 2^18 features), so the signal is the
        same bits in fp32 and fp64 and in any summation order."""
        xn, (xq, xs), q, kd, vd, k, v, _, _ = self.qkv(layer, h, pos)
        x = xq if xs is None else xq * xs  # the dequantized input
        vis = slice(start, start + n)
        hv = h[:, vis].to(self.hp)
        mag = (hv * hv).sum(-1).sqrt()  # [1, n]
        cs = self._cosine(xq, start, n)
        later = torch.ones(n, n, dtype=torch.bool).triu()  # j >= i: not compared
        div = 1.0 - cs.masked_fill(later, -1.0).amax(dim=-1)
        T = h.shape[1]
        qt = q[:, :, start + n : T]  # instruction (text) queries after the image
        p, _ = self.attend(qt, kd, vd, causal_offset=start + n, bias=bias)
        att = p[..., vis].mean(dim=(1, 2))  # [1, n]
        hp = self.hp
        xv = xn[:, vis]
        dif, xvh = (x[:, vis] - xv).to(hp), xv.to(hp)
        risk = (dif * dif).sum(-1).sqrt() / (xvh * xvh).sum(-1).sqrt().clamp_min(1e-12)
        if self.cfg.kv_bits < 16:
            for fq, fp in ((kd, k), (vd, v)):
                dd, b = (fq[:, :, vis] - fp[:, :, vis]).to(hp), fp[:, :, vis].to(hp)
                num = (dd * dd).sum(dim=(1, 3)).sqrt()
                den = (b * b).sum(dim=(1, 3)).sqrt().clamp_min(1e-12)
                risk = risk + num / den
        return mag, att, risk, div

    def score(self, stage, layer, h, pos, start, n, bias=None):
        if stage.select == "maxmin":
            return self.maxmin_score(layer, h, pos, start, n, stage.keep)
        return stage_score(stage, *self.signals(layer, h, pos, start, n, bias))

    def _cosine(self, xq, start: int, n: int):
        """[1, n, n] (hp) cosine similarity of the visual tokens' attention-input codes:
        cs[i, j] = (f_i . f_j) / |f_i| / |f_j| in that order (exact dot products on integer codes;
        the graphs compute the same expression, so the matrix is the same bits there)."""
        f = xq[:, start : start + n].to(self.hp)
        nf = (f * f).sum(-1).sqrt().clamp_min(1e-12)  # [1, n]
        return (f @ f.transpose(-1, -2)) / nf[..., :, None] / nf[..., None, :]

    def maxmin_score(self, layer: int, h, pos, start: int, n: int, k: int):
        """`select: maxmin`: greedy max-min diversity selection (DivPrune's rule, `maxmin_order`)
        of k of the n visual tokens on the cosine similarity of the attention input's integer
        codes at this layer (the deployed quantizer's view, as the diversity signal and merging
        use), as a score [1, n] fp32: the i-th token picked gets k - i, the others 0, so the
        stage's top-k keeps exactly the picked set (the graphs feed it to the same gather)."""
        from quota_export.prune.selectors import maxmin_order

        _, (xq, _), *_ = self.qkv(layer, h, pos)
        order = maxmin_order(self._cosine(xq, start, n), k)
        s = torch.zeros(1, n)
        s[0, order[0]] = torch.arange(k, 0, -1, dtype=torch.float32)
        return s

    # ------------------------------------------------------------ merging (pruning.merge: proportional)
    def merge_counts(self, layer: int, h, pos, idx, start: int, n: int, cnt):
        """Counts of the kept tokens after a stage that keeps `idx` [1,k] (ascending) of the n
        visual tokens with counts `cnt` [n] (float64): each dropped token adds its count to the
        kept token most similar to it (cosine of the attention input's integer codes, as the
        diversity signal; ties: the lower kept index). A kept token that stands for c tokens gets
        log(c) added to its attention logits (`key_bias`): where the dropped tokens repeat a kept
        one (e.g. background patches), the softmax sees nearly the mass it saw before pruning,
        the proportional attention of token merging. -> [k] float64."""
        _, (xq, _), *_ = self.qkv(layer, h, pos)
        cs = self._cosine(xq, start, n)[0]  # as `signals` computes it (exact on codes)
        keep = idx[0]
        dropped = torch.ones(n, dtype=torch.bool)
        dropped[keep] = False
        drop = dropped.nonzero()[:, 0]
        out = cnt[keep].clone()
        if drop.numel():
            out.index_add_(0, cs[drop][:, keep].argmax(dim=-1), cnt[drop])  # argmax: first maximum
        return out

    def key_bias(self, cnt, start: int):
        """[start + k] (hp) attention-logit bias: 0 on the text before the span, log(count) on
        the k kept visual tokens; keys after them get none. None without counts."""
        if cnt is None:
            return None
        return torch.cat([torch.zeros(start, dtype=self.hp), cnt.log().to(self.hp)])

    def prune_stage(self, layer: int, h, pos, idx, start: int, n: int):
        """Keep the visual rows `idx` [1,k] (ascending) of the span [start, start+n) at a stage
        before `layer` -> (h', pos', pre), `pre` = the layer's q/k/v and cache rows of the kept
        stream taken from the full stream's pass (every op before attention is per token, so
        gathering equals recomputing; the graphs do the same). Text rows are never dropped."""
        _, _, q, kd, vd, _, _, kq, vq = self.qkv(layer, h, pos)
        T = h.shape[1]
        rows = torch.cat([torch.arange(start), start + idx[0], torch.arange(start + n, T)])
        pick = lambda t: None if t is None else t.index_select(2, rows)  # noqa: E731
        pre = (pick(q), pick(kd), pick(vd),
               None if kq is None else tuple(pick(t) for t in kq),
               None if vq is None else tuple(pick(t) for t in vq))  # fmt: skip
        return h.index_select(1, rows), pos.index_select(pos.dim() - 1, rows), pre

    # ------------------------------------------------------------ forward / generate
    @torch.no_grad()
    def prefill(self, embeds, pos, start: int, n: int, keep_fn=None) -> PrefillOut:
        """embeds [1,T,D] float, pos [1,T] (or M-RoPE planes [P,1,T]) int64. `keep_fn(stage, layer, h, pos, start, n)`, if
        given, replaces the recipe's scorer (used by the stage-wise baselines), returning [1,k]."""
        h = embeds.float()
        orig = torch.arange(n)[None]
        cache, kept, scores = [], [], []
        cnt = bias = None  # merged-token counts [n] and the key bias they give (pruning.merge)
        for l in range(self.spec.num_layers):
            st = self.stage_at.get(l)
            if st is not None:
                if keep_fn is not None:
                    idx, s = keep_fn(st, l, h, pos, start, n), None
                else:
                    s = self.score(st, l, h, pos, start, n, bias)
                    idx = stable_topk(s, st.keep)
                if self.cfg.merge:
                    cnt = self.merge_counts(l, h, pos, idx, start, n, torch.ones(n, dtype=torch.float64) if cnt is None else cnt)
                    bias = self.key_bias(cnt, start)
                h, pos, pre = self.prune_stage(l, h, pos, idx, start, n)
                orig = orig[:, idx[0]]
                kept.append(orig.clone())
                scores.append(s)
                n = st.keep
            h, kv = self.layer(l, h, pos, pre if st is not None else None, bias)
            cache.append(kv)
        hl = rmsnorm(h[:, -1], self.norm, self.spec.rms_eps, self.hp)
        return PrefillOut(hl @ self.lm_head.T, cache, kept, scores, pos)

    @torch.no_grad()
    def decode(self, emb, pos, cache: list[LayerKV]):
        """One step: emb [1,1,D], pos [1,1] (or [P,1,1] for M-RoPE); appends to each layer's cache in place."""
        sp = self.spec
        h = emb.float()
        for l in range(sp.num_layers):
            _, _, q, kd, vd, _, _, _, _ = self.qkv(l, h, pos)
            c = cache[l]
            c.k = torch.cat([c.k, kd], dim=2)
            c.v = torch.cat([c.v, vd], dim=2)
            _, o = self.attend(q, c.k, c.v, causal_offset=None, bias=c.bias)
            o = o.transpose(1, 2).reshape(1, 1, sp.heads * sp.head_dim)
            h = h + self.mm(self.act(o, l, "self_attn.o_proj"), l, "self_attn.o_proj")
            h = h + self.mlp(l, h)
        hl = rmsnorm(h[:, -1], self.norm, sp.rms_eps, self.hp)
        return hl @ self.lm_head.T

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
