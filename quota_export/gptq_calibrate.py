"""GPTQ weights calibrated on the token streams the deployed model really produces (docs/design.md §4).

    prompts --embed--> h_0 of every calibration sample
    for layer l = 0 .. L-1 (sequentially, as GPTQ and llm-compressor do):
        for group in [q,k,v] [o] [gate,up] [down]:       # "true sequential" inside the layer
            run layer l on every sample's h_l, recording the input each linear of the group
            really sees (quantized activations as the integers times their per-token scale)
            -> H = 2 X^T X / n;  W <- GPTQ(W, H)           # later groups see the new weights
        h_{l+1} = layer l of h_l (GPTQ weights, the schedule's pruning stage at l if any)

The stream is the one `Deployed.prefill` computes (same calls: `step` is its loop body), with
the recipe's quantizers and pruning schedule, so every later layer is calibrated on the pruned,
quantized stream. At a pruning stage q/k/v see the full stream (every visual token is scored
from its key), the rest of the layer only the kept tokens, as in the graphs. Prompt tokens only
(no generated tokens). Modules quantized outside the decoder linears keep their RTN weights.

Per quantized linear `stats` holds the mean squared output error tr(dW H dW^T)/2 of the GPTQ
and of the RTN weight on the same recorded inputs (the objective GPTQ minimises).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quota_export.quant.gptq import HessianAccumulator, gptq
from quota_export.quant.quantizers import QWeight
from quota_export.reference import LINEARS, Deployed

GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
assert sorted(sum(GROUPS, ())) == sorted(LINEARS)


class _Recording(Deployed):
    """Deployed whose quantized matmuls add their input to `acc[(layer, lin)]` while `on`."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.acc: dict[tuple[int, str], HessianAccumulator] = {}
        self.on = True

    def mm(self, xs, layer: int, lin: str):
        acc = self.acc.get((layer, lin)) if self.on else None
        if acc is not None:
            x, s = xs
            acc.add(x if s is None else x * s)
        return super().mm(xs, layer, lin)


@dataclass
class State:
    """One sample at the input of a layer: hidden states, position ids, visual span (start, n)."""

    h: torch.Tensor
    pos: torch.Tensor
    start: int
    n: int
    cnt: torch.Tensor | None = None  # merged-token counts [n] (pruning.merge), after the first stage


@dataclass
class GPTQResult:
    qweights: dict[str, QWeight]
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (gptq error, rtn error)

    def error_ratio(self) -> float:
        """Sum over linears of the GPTQ output error / the same sum for RTN."""
        g = sum(v[0] for v in self.stats.values())
        r = sum(v[1] for v in self.stats.values())
        return g / r if r > 0 else 1.0


def initial_states(dep: Deployed, prompts) -> list[State]:
    return [State(dep.stream(p), p.positions(), p.visual_start, p.n_visual) for p in prompts]


@torch.no_grad()
def step(dep: Deployed, layer: int, st: State) -> State:
    """Layer `layer` of `Deployed.prefill` (pruning stage at that layer included) on one sample."""
    from quota_export.ops.gather import stable_topk

    h, pos, start, n, cnt = st.h, st.pos, st.start, st.n, st.cnt
    stage = dep.stage_at.get(layer)
    pre = None
    if stage is not None:
        on = getattr(dep, "on", None)
        if on is not None:  # the scorer's own q/k/v passes are not a second copy of the inputs
            dep.on = False
        s = dep.score(stage, layer, h, pos, start, n, dep.key_bias(cnt, start))
        idx = stable_topk(s, stage.keep)
        if dep.cfg.merge:
            cnt = dep.merge_counts(layer, h, pos, idx, start, n, torch.ones(n, dtype=torch.float64) if cnt is None else cnt)
        if on is not None:
            dep.on = on
        h, pos, pre = dep.prune_stage(layer, h, pos, idx, start, n)  # q/k/v see the full stream
        n = stage.keep
    h, _ = dep.layer(layer, h, pos, pre, dep.key_bias(cnt, start))
    return State(h, pos, start, n, cnt)


def output_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> float:
    """Mean squared output error per input row, tr(dW H dW^T) / 2 with H = 2 X^T X / n."""
    d = (wq.double() - w.double())
    return float(((d @ H) * d).sum()) / 2.0


@torch.no_grad()
def gptq_weights(adapter, cfg, wq, prompts, base: dict[str, QWeight] | None = None,
                 progress: bool = False) -> GPTQResult:
    """GPTQ for every quantized decoder linear, layer by layer on the deployed stream.

    cfg: the DeployConfig (quantizers and the pruning stages to calibrate under; no stages =
    full token streams); wq: the resolved WeightQuant (bits, groups, gptq args); base: RTN
    weights of cfg (computed if None), kept for modules outside the decoder linears."""
    from tqdm import tqdm

    dep = _Recording(adapter, cfg, None if base is None else dict(base))
    base = dict(dep.qweights) if base is None else base
    pre = dep.spec.module_prefix
    states = initial_states(dep, prompts)
    res = GPTQResult(dep.qweights)
    for l in tqdm(range(dep.spec.num_layers), desc="calibrate: gptq", disable=not progress, unit="layer"):
        for group in GROUPS:
            names = {lin: f"{pre}.layers.{l}.{lin}" for lin in group if f"{pre}.layers.{l}.{lin}" in base}
            if not names:
                continue
            dep.acc = {(l, lin): HessianAccumulator(dep.W[l][lin].shape[1]) for lin in names}
            for st in states:
                step(dep, l, st)
            for lin, name in names.items():
                H = dep.acc[(l, lin)].hessian
                w = dep.float_weight(name)  # rotated with rotation
                qw = gptq(w, H, wq, act_bits=cfg.a_bits)
                W = qw.dequant()
                res.stats[name] = (output_error(w, W, H), output_error(w, base[name].dequant(), H))
                dep.qweights[name] = qw
                dep.W[l][lin] = W
            dep.acc = {}
        states = [step(dep, l, st) for st in states]
    return res
