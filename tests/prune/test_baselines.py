"""Stage-wise baselines: each meets the budget exactly, and selects ascending unique indices."""

from __future__ import annotations

import math

import pytest
import torch

from quota_export.prune import baselines
from quota_export.prune.baselines import METHODS, fit_keeps, schedule
from quota_export.prune.schedule import total_kept

torch.set_num_threads(1)


def _total(sched, n, L):
    return total_kept([l for l, _ in sched], [k for _, k in sched], n, L)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("L,budget", [(6, 0.3), (4, 0.3), (6, 0.5), (32, 0.25), (6, 0.1)])
def test_schedule_meets_budget_exactly(method, L, budget):
    n = 144
    sched = schedule(method, n, L, budget)
    cap = math.floor(budget * n * L + 1e-9)
    assert sched
    layers = [l for l, _ in sched]
    keeps = [k for _, k in sched]
    assert layers == sorted(set(layers)) and layers[-1] < L
    assert all(1 <= k <= n for k in keeps) and keeps == sorted(keeps, reverse=True)
    assert _total(sched, n, L) <= cap
    # exactly: the fitted first keep is the largest that meets the budget
    ratio = {"pdrop": baselines.PDROP_LAMBDA, "sparsevlm": baselines.SPARSEVLM_RATIO}.get(method, 1.0)
    k1 = keeps[0]
    more = [max(1, math.floor((k1 + 1) * ratio**j + 1e-9)) for j in range(len(layers))]
    assert k1 == n or total_kept(layers, more, n, L) > cap


def test_fastv_layer_and_budget_one():
    assert schedule("fastv", 144, 32, 0.3)[0][0] == 2
    assert schedule("fastv", 144, 6, 0.3)[0][0] == 1  # layer 2 cannot meet 0.3 on 6 layers
    assert schedule("pdrop", 144, 32, 0.5) and [l for l, _ in schedule("pdrop", 144, 32, 0.5)] == [8, 16, 24]
    assert all(schedule(m, 144, 6, 1.0) == [] for m in METHODS)
    assert fit_keeps([0], 1.0, 144, 6, 0.3) == [43]


@pytest.fixture(scope="module")
def deps(tiny_llava):
    from quota_export import models
    from quota_export.data import load_bench, load_image
    from quota_export.reference import DeployConfig, Deployed

    ad = models.load(tiny_llava)
    fp = Deployed(ad, DeployConfig())
    q = Deployed(ad, DeployConfig.of("w4a4kv4"))
    prompts = [ad.prompt(load_image(s), s.question) for s in load_bench("calib_data/shapes/calib.jsonl", limit=2)]
    return ad, fp, q, prompts


@pytest.mark.parametrize("method", METHODS)
def test_selection_ascending_unique_and_replayed(deps, method):
    ad, fp, q, prompts = deps
    L = fp.spec.num_layers
    sched = schedule(method, ad.n_visual(), L, 0.3)
    for i, p in enumerate(prompts):
        emb = fp.embed_prompt(p)
        pos = torch.arange(emb.shape[1])[None]
        chosen = baselines.fp_selection(fp, method, sched, emb, pos, p.visual_start, p.n_visual, seed=i)
        assert [c.shape[1] for c in chosen] == [k for _, k in sched]
        n = p.n_visual
        for c, (_, k) in zip(chosen, sched):
            v = c[0].tolist()
            assert v == sorted(set(v)) and 0 <= v[0] and v[-1] < n and c.dtype == torch.int64
            n = k
        # the quantized model drops exactly the tokens the FP model chose
        qd = baselines.restaged(q, sched)
        out = qd.prefill(emb, pos, p.visual_start, p.n_visual, keep_fn=baselines.replay(chosen))
        fpo = baselines.restaged(fp, sched).prefill(emb, pos, p.visual_start, p.n_visual,
                                                    keep_fn=baselines.replay(chosen))
        assert all(torch.equal(a, b) for a, b in zip(out.kept, fpo.kept))
        assert [k.shape[1] for k in out.kept] == [k for _, k in sched]

