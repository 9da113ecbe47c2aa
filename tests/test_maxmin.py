"""Max-min selection stages (`select: maxmin`): the greedy rule, the reference, the graphs.

`maxmin_order` is checked against a plain-Python greedy (ties to the lower index); the
reference's `maxmin_score` keeps exactly what `maxmin_order` picks on the stage's code cosine;
the lowered prefill (ONNX Runtime, onnx and tensorrt-style fp32 reductions) keeps the same
indices as the reference on the tiny model; recipes reject score weights on a max-min stage and
max-min stages after layer 0 (the reference runs them anywhere; recipes, and so the graphs, only
at the decoder input, which both sides compute bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_merge import run, session

from calib_data.shapes import make_sample, render
from quota_export import models
from quota_export.lower.decoder import DecoderLowering
from quota_export.prune.selectors import divprune, maxmin_order
from quota_export.recipe import Recipe
from quota_export.reference import DeployConfig, Deployed, StageCfg
from quota_export.verify import sqnr_db

torch.set_num_threads(1)
ONES = (1.0, 1.0, 1.0, 1.0)
ZERO = (0.0, 0.0, 0.0, 0.0)


def greedy(sim: np.ndarray, k: int) -> list[int]:
    """The rule in plain Python: start = argmin_i max_{j != i} sim[i][j], then argmin_i of
    max_{s picked} sim[i][s] over the unpicked; first minimum everywhere."""
    n = len(sim)
    near = [max([sim[i][j] for j in range(n) if j != i], default=-np.inf) for i in range(n)]
    order = [min(range(n), key=lambda i: (near[i], i))]
    while len(order) < k:
        rest = [i for i in range(n) if i not in order]
        order.append(min(rest, key=lambda i: (max(sim[i][s] for s in order), i)))
    return order


def test_maxmin_order_is_the_greedy_rule():
    g = torch.Generator().manual_seed(0)
    for n, k in ((1, 1), (5, 3), (12, 12), (30, 7)):
        sim = torch.randn(2, n, n, generator=g, dtype=torch.float64)  # not symmetric: rows as given
        got = maxmin_order(sim, k)
        assert got.dtype == torch.int64 and got.shape == (2, k)
        for b in range(2):
            assert got[b].tolist() == greedy(sim[b].tolist(), k)
    assert maxmin_order(torch.zeros(1, 4, 4), 0).shape == (1, 0)
    with pytest.raises(ValueError, match="k=5 out of range"):
        maxmin_order(torch.zeros(1, 4, 4), 5)


def test_maxmin_ties_go_to_the_lower_index():
    # tokens 0..5 are three pairs of duplicates (a a b b c c): one of each, the first, then a repeat
    x = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
    f = x / x.norm(dim=-1, keepdim=True)
    sim = (f @ f.T)[None].double()
    assert maxmin_order(sim, 4)[0].tolist() == [0, 2, 4, 1]
    # divprune (distances) is the same rule
    assert divprune(x[None], 4)[0].tolist() == [0, 1, 2, 4]


@pytest.fixture(scope="module")
def adapter(tiny_llava):
    return models.load(tiny_llava)


def deployed(adapter, stages, merge=False, fp64=True):
    return Deployed(adapter, DeployConfig.of("w4a4kv4", stages=list(stages), merge=merge, fp64=fp64))


def test_reference_keeps_the_maxmin_picks_of_the_code_cosine(adapter):
    stages = [StageCfg(0, 40, ZERO, ONES, "maxmin"), StageCfg(3, 12, (0.0, 1.0, 0.0, 0.0), ONES)]
    dep = deployed(adapter, stages)
    scene, q = make_sample(0)
    pr = adapter.prompt(render(scene), q["question"])
    emb, pos, s0, n = dep.embed_prompt(pr), pr.positions(), pr.visual_start, pr.n_visual
    out = dep.prefill(emb, pos, s0, n)
    want = torch.sort(maxmin_order(dep.cosine(0, emb.float(), pos, s0, n), 40)).values
    assert torch.equal(out.kept[0], want)
    sc = out.scores[0]
    assert sorted(sc[0][sc[0] > 0].tolist()) == list(range(1, 41))  # the picks ranked k..1, the rest 0
    # not the top-k of any of the stage's own signals (the rule is a set selection)
    topk = deployed(adapter, [StageCfg(0, 40, (0.0, 0.0, 0.0, 1.0), ONES)]).prefill(emb, pos, s0, n).kept[0]
    assert not torch.equal(out.kept[0], topk)


@pytest.mark.parametrize("merge,fp64", [(False, True), (True, True), (True, False)])
def test_graphs_keep_what_the_reference_keeps(adapter, merge, fp64):
    stages = [StageCfg(0, 50, ZERO, ONES, "maxmin"), StageCfg(2, 30, (1.0, 1.0, 1.0, 1.0), (10.0, 0.01, 1.0, 0.5))]
    dep = deployed(adapter, stages, merge=merge, fp64=fp64)
    probe = adapter.prompt(np.zeros((*adapter.image_size(), 3), np.uint8), "describe image")
    low = DecoderLowering(dep, probe.n_visual, probe.visual_start, target="onnx" if fp64 else "tensorrt")
    model = low.prefill(21)
    assert sum(n.op_type == "Or" for n in model.graph.node) == 50 - 1  # unrolled greedy steps
    if not fp64:  # the tensorrt target: its plugin node stands in for the gather; run the onnx form
        model = DecoderLowering(dep, probe.n_visual, probe.visual_start).prefill(21)
    pre = session(model)
    for seed in range(3):
        scene, q = make_sample(seed)
        pr = adapter.prompt(render(scene), q["question"])
        emb = dep.embed_prompt(pr)
        ref = dep.prefill(emb, pr.positions(), pr.visual_start, pr.n_visual)
        out = run(pre, {"inputs_embeds": emb.numpy(), "position_ids": pr.positions().numpy()})
        for i, k in enumerate(ref.kept):
            np.testing.assert_array_equal(out[f"kept.{i}"], k.numpy())
        assert sqnr_db(ref.logits.numpy(), out["logits"]) >= 80.0


def test_recipe_maxmin_stage_takes_no_score_weights():
    base = {"name": "r", "model": "m", "quant": {"scheme": "w4a4kv4"},
            "pruning": {"budget": 0.3, "n_visual": 144, "stages": [
                {"layer": 0, "keep": 43, "select": "maxmin",
                 "weights": {"magnitude": 0, "attention": 0, "risk": 0, "diversity": 0}}]}}
    assert Recipe.model_validate(base).pruning.stages[0].select == "maxmin"
    bad = {**base, "pruning": {**base["pruning"], "stages": [{"layer": 0, "keep": 43, "select": "maxmin"}]}}
    with pytest.raises(Exception, match="select maxmin uses no score: its weights must all be 0"):
        Recipe.model_validate(bad)
    assert Recipe.model_validate({**base, "pruning": {**base["pruning"], "stages": [{"layer": 0, "keep": 43}]}}
                                 ).pruning.stages[0].select == "topk"
    deep = {**base, "pruning": {**base["pruning"], "stages": [{**base["pruning"]["stages"][0], "layer": 2}]}}
    with pytest.raises(Exception, match="select maxmin is only supported at layer 0 .the decoder input., not layer 2"):
        Recipe.model_validate(deep)
