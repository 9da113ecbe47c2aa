"""The search's plan (calibrate/plan.py): the full space on small models, a space cut to a few reference
passes on deep ones; a cut search stays within its allowance and deterministic across processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from quota_export.calibrate import CandStage, Evaluator, Scorer, search
from quota_export.calibrate import plan as P
from quota_export.recipe import SIGNALS

torch.set_num_threads(1)
DATA = "calib_data/shapes/calib.jsonl"

SHIPPED = SimpleNamespace(num_layers=6, hidden=192, heads=6, kv_heads=6, head_dim=32, intermediate=512)
TINYLLAVA = SimpleNamespace(num_layers=22, hidden=2048, heads=32, kv_heads=4, head_dim=64, intermediate=5632)


def test_full_space_on_the_shipped_model_cut_on_a_deep_one():
    shipped = P.choose(SHIPPED, 144, [164] * 128, 0.3, SIGNALS)
    assert shipped == P.full_plan(6, 144, 0.3, SIGNALS) and shipped.full
    deep = P.choose(TINYLLAVA, 576, [620] * 32, 0.3, SIGNALS)
    full = P.full_plan(22, 576, 0.3, SIGNALS)
    assert not deep.full
    cost = P.Cost(TINYLLAVA, 576, [620] * 32)
    m = P.screen_size(32)
    work = lambda plan: len(plan.starts) * sum(cost.candidate(ls, ks, m) for ls, _, ks in plan.shapes(22, 576, 0.3))  # noqa: E731
    assert work(full) > 50 * cost.pass_work  # the full space: ~95 passes
    assert 0 < work(deep) <= P.A_SHARE * P.SCREEN_PASSES * cost.pass_work
    assert len(deep.grid) < len(full.grid) and deep.starts and set(deep.starts) <= set(full.starts)
    assert deep.screen_allowance == pytest.approx(P.SCREEN_PASSES * cost.pass_work)
    worst = max(cost.candidate(ls, ks, 32) for ls, _, ks in deep.shapes(22, 576, 0.3))
    assert 1 <= deep.finalists and (deep.finalists == 1 or deep.finalists * worst <= P.EXACT_PASSES * cost.pass_work)
    # fewer samples: the same allowance in passes buys fewer candidates (the screen is all 8 samples)
    small = P.choose(TINYLLAVA, 576, [620] * 8, 0.3, SIGNALS)
    assert len(small.shapes(22, 576, 0.3)) * len(small.starts) <= len(deep.shapes(22, 576, 0.3)) * len(deep.starts)
    # ablations keep their signals in a cut plan too
    assert all(s.weights[1] == 0 for s in P.choose(TINYLLAVA, 576, [620] * 32, 0.3, ("magnitude", "diversity")).starts)


def test_cost_counts_layers_after_the_first_stage():
    cost = P.Cost(SHIPPED, 144, [164, 164])
    unpruned = cost.candidate([0], [144], 2)
    assert unpruned == pytest.approx(cost.pass_work)  # keeping everything from layer 0 costs a pass
    assert cost.candidate([3], [144], 2) == pytest.approx(cost.pass_work / 2)
    assert cost.candidate([0, 2], [60, 20], 1) < cost.candidate([0], [60], 1) < unpruned / 2


def _setup(tiny_llava):
    from quota_export import models
    from quota_export.data import load_bench, load_image
    from quota_export.reference import DeployConfig, Deployed

    ad = models.load(tiny_llava)
    dep = Deployed(ad, DeployConfig.of("w4a4kv4", merge=True))
    prompts = [ad.prompt(load_image(s), s.question) for s in load_bench(DATA, limit=10)]
    return dep, prompts


def test_one_stage_measured_per_sample_in_workers_is_exact(tiny_llava):
    dep, prompts = _setup(tiny_llava)
    cand = (CandStage(0, 30, Scorer((0.0, 1.0, 0.0, 0.0))),)
    with Evaluator(dep, prompts, layers=[0, 1, 2, 3]) as ev:
        want = ev.exact.per_sample(cand)
    with Evaluator(dep, prompts, layers=[0, 1, 2, 3], workers=2) as ev2:
        assert ev2.per_sample(cand) == want  # bit for bit, in sample order
        top = ev2.focus(cand, 3)
        assert top == sorted(sorted(range(len(want)), key=lambda i: (-want[i], i))[:3])


def test_cut_search_within_allowance_and_same_with_one_or_two_processes(tiny_llava):
    dep, prompts = _setup(tiny_llava)
    N = 144
    L = dep.spec.num_layers
    cost = P.Cost(dep.spec, N, [p.input_ids.shape[1] for p in prompts])
    m = P.screen_size(len(prompts))
    starts = P._starts(SIGNALS, 2)
    shapes = P.shape_candidates(L, N, 0.3, (0, 2), (0.5,), 2)
    a_work = len(starts) * sum(cost.candidate(ls, ks, m) for ls, _, ks in shapes)
    plan = P.Plan((0, 2), starts, (0.5,), 2, tuple(Scorer(w) for w in P.B_SMALL), 1, P.FINE_SMALL, 2, False,
                  a_work * 1.5, cost.pass_work)  # B and C get half of phase A's work: they stop early
    results = []
    for workers in (1, 2):
        with Evaluator(dep, prompts, layers=plan.grid, workers=workers) as ev:
            res = search(ev, 0.3, plan=plan)
            screened = [c for c in ev.screen.cache if c]
            spent = sum(cost.candidate([s.layer for s in c], [s.keep for s in c], m) for c in screened)
            naive_c = (CandStage(0, 43, Scorer((0.0, 1.0, 0.0, 0.0))),)
            naive = cost.candidate([0], [43], m)
            assert spent - naive <= plan.screen_allowance * (1 + 1e-9)
            phase_a = {tuple(CandStage(*x) for x in zip(ls, ks, [w] * len(ls))) for w in starts for ls, _, ks in shapes}
            assert [c for c in screened if c not in phase_a and c != naive_c]  # B/C ran, within the allowance
            assert res.stages in ev.exact.cache and res.divergence == ev.exact.cache[res.stages]
            assert res.divergence <= res.naive_divergence
            results.append((res.stages, res.sigmas, res.divergence, res.evals))
    assert results[0] == results[1]


def test_batch_bounds_change_no_value(tiny_llava, monkeypatch):
    """Batches are bounded by tokens and attention scores; a row is its sample's result bit for bit,
    so one sample a batch gives the same divergences and sigmas."""
    from quota_export.calibrate import evaluator

    dep, prompts = _setup(tiny_llava)
    cands = [(CandStage(0, 40, Scorer((0.0, 1.0, 0.0, 1.0))), CandStage(2, 12, Scorer((0.0, 1.0, 0.0, 0.0))))]
    with Evaluator(dep, prompts, layers=[0, 2]) as ev:
        assert any(len(b.idx) > 1 for b in ev.exact.batches)
        want, sig = ev.exact.divergence(cands), ev.exact.stage_sigmas(cands[0])
    monkeypatch.setattr(evaluator, "MAX_BATCH_SCORES", 1)
    with Evaluator(dep, prompts, layers=[0, 2]) as ev:
        assert all(len(b.idx) == 1 for b in ev.exact.batches)
        assert ev.exact.divergence(cands) == want and ev.exact.stage_sigmas(cands[0]) == sig


def test_candidate_workers_cache_the_last_layers(tiny_llava, monkeypatch):
    from quota_export.calibrate import evaluator
    from quota_export.weightcache import PinnedCache

    dep, prompts = _setup(tiny_llava)
    L = dep.spec.num_layers
    layer_bytes = sum(dep.W[L - 1][lin].numel() * 4 for lin in dep.W[L - 1])
    dep._cache = PinnedCache(2 * layer_bytes)  # room for two layers
    for W in dep.W:
        W.cache = dep._cache
    monkeypatch.setattr(evaluator, "_WORKER_EV", SimpleNamespace(dep=dep))
    evaluator._warm_tail()
    kept = {int(k[1].split(".layers.")[1].split(".")[0]) for k in dep._cache.kept}
    assert kept == {L - 2, L - 1}
