"""QUOTA calibration on the tiny model: determinism, validity, budget, and the search beats naive."""

from __future__ import annotations

import pytest
import torch

from quota_export.calibrate import (
    Evaluator,
    calibrate,
    geometric_keeps,
    kl,
    select_samples,
    shape_candidates,
    total_kept,
)
from quota_export.recipe import load_recipe, save_recipe

pytestmark = pytest.mark.slow  # calibration searches (~90 s together)

torch.set_num_threads(1)
DATA = "calib_data/shapes/calib.jsonl"
SAMPLES = 6


@pytest.fixture(scope="module")
def calibrated(tiny_llava, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib")
    paths = []
    for i in range(2):
        recipe, res = calibrate(tiny_llava, DATA, 0.3, "w4a4kv4", SAMPLES, seed=3, name="tiny-q")
        p = out / f"r{i}.yaml"
        save_recipe(recipe, p)
        paths.append(p)
    return paths, res


def test_same_seed_same_bytes(calibrated):
    (a, b), _ = calibrated
    assert a.read_bytes() == b.read_bytes()


def test_recipe_validates_and_meets_budget(calibrated, tiny_llava):
    from quota_export import models

    (path, _), res = calibrated
    r = load_recipe(path)
    ad = models.load(tiny_llava)
    L = ad.decoder_spec().num_layers
    r.check_against(L, ad.n_visual(), ad.module_names())  # raises if over budget
    assert r.pruning.stages and r.mean_keep_fraction(L) <= 0.3 + 1e-12
    c = r.calibration
    assert (c.method, c.samples, c.seed, c.data) == ("quota", SAMPLES, 3, DATA)
    assert c.divergence is not None and "torch" in c.versions
    for s in r.pruning.stages:
        assert s.sigma.magnitude > 0 and s.sigma.attention > 0 and s.sigma.risk > 0


def _divergence_via_reference(dep, prompts):
    """Mean KL(unpruned || pruned) computed with Deployed.prefill only (independent of the fast path)."""
    from quota_export.prune.baselines import restaged

    full = restaged(dep, [])
    tot = 0.0
    for p in prompts:
        emb = dep.embed_prompt(p)
        pos = torch.arange(emb.shape[1])[None]
        ref = torch.log_softmax(full.prefill(emb, pos, p.visual_start, p.n_visual).logits.double().flatten(), -1)
        tot += kl(ref, dep.prefill(emb, pos, p.visual_start, p.n_visual).logits)
    return tot / len(prompts)


def test_divergence_matches_reference_and_beats_naive(calibrated, tiny_llava):
    from quota_export.build import load_deployed
    from quota_export.data import load_image
    from quota_export.recipe import Stage

    (path, _), res = calibrated
    r = load_recipe(path)
    ad, dep = load_deployed(r)
    prompts = [ad.prompt(load_image(s), s.question) for s in select_samples(DATA, SAMPLES, 3)]
    d = _divergence_via_reference(dep, prompts)
    assert d == pytest.approx(r.calibration.divergence, rel=1e-5, abs=1e-12)
    # naive: one attention-only stage at layer 0 keeping floor(budget * N)
    naive = r.model_copy(deep=True)
    naive.pruning.stages = [Stage(layer=0, keep=int(0.3 * 144), sigma=r.pruning.stages[0].sigma)]
    _, ndep = load_deployed(naive)
    assert d <= _divergence_via_reference(ndep, prompts) + 1e-12


@pytest.mark.parametrize("merge", [False, True])
def test_fast_path_equals_reference_prefill(tiny_llava, merge):
    """Evaluator (cached prefix, memoised stages, stream-measured sigmas) == Deployed.prefill bit for bit,
    with and without merging (the counts and key bias carried from stage to stage)."""
    from quota_export import models
    from quota_export.calibrate import MAXMIN, CandStage, Scorer
    from quota_export.data import load_bench, load_image
    from quota_export.prune.baselines import restaged
    from quota_export.reference import DeployConfig, Deployed, StageCfg

    ad = models.load(tiny_llava)
    dep = Deployed(ad, DeployConfig.of("w4a4kv4", merge=merge))
    prompts = [ad.prompt(load_image(s), s.question) for s in load_bench(DATA, limit=2)]
    ev = Evaluator(dep, prompts)
    cand = (CandStage(1, 40, Scorer((0.5, 1.0, 0.5, 1.0))), CandStage(2, 20, Scorer((1.0, 1.0, 1.0, 0.0))),
            CandStage(3, 7, Scorer((0.0, 1.0, 0.0, 2.0))))
    other = cand[:2] + (CandStage(3, 9, MAXMIN),)  # a max-min stage (select: maxmin) too
    d_other, d = ev.divergence([other, cand])  # one batch: `cand` reuses `other`'s prefix
    sig = ev.stage_sigmas(cand)
    assert sig[:2] == ev.stage_sigmas(other)[:2]
    ref_dep = restaged(dep, [])
    for c, want in ((cand, d), (other, d_other)):
        ref_dep.cfg.stages = [StageCfg(st.layer, st.keep, st.scorer.weights, s, st.scorer.select)
                              for st, s in zip(c, ev.stage_sigmas(c))]
        ref_dep.stage_at = {s.layer: s for s in ref_dep.cfg.stages}
        tot = 0.0
        for smp, p in zip(ev.samples, prompts):
            emb = dep.embed_prompt(p)
            out = ref_dep.prefill(emb, torch.arange(emb.shape[1])[None], p.visual_start, p.n_visual)
            tot += kl(smp.ref_logp, out.logits)
        assert tot / len(prompts) == want  # bit for bit
    assert ref_dep.cfg.stages[-1].select == "maxmin" and d_other != d
    assert (out.cache[-1].bias is not None) == merge
    # sigma of stage 2 is measured on the stream after stage 1 (not the unpruned one)
    unpruned = ev.stage_sigmas((CandStage(2, 20, Scorer((0.0, 1.0, 0.0, 0.0))),))[0]
    assert unpruned != sig[1]


def test_schedule_family_meets_budget():
    for L, budget in ((6, 0.3), (4, 0.3), (6, 0.5), (32, 0.2)):
        cap = int(budget * 144 * L + 1e-9)
        shapes = shape_candidates(L, 144, budget)
        assert shapes
        for layers, _r, keeps in shapes:
            assert total_kept(layers, keeps, 144, L) <= cap
            assert list(layers) == sorted(set(layers))
            assert all(keeps[j] < keeps[j - 1] for j in range(1, len(keeps)))
    # maximal: one more token at the first stage breaks the budget
    ks = geometric_keeps((1, 3), 0.5, 144, 6, 0.3)
    assert total_kept((1, 3), ks, 144, 6) <= 259 < total_kept((1, 3), [ks[0] + 1, (ks[0] + 1) // 2], 144, 6)


def test_select_samples_seeded_and_balanced():
    a = select_samples(DATA, 12, 0)
    assert [s.id for s in a] == [s.id for s in select_samples(DATA, 12, 0)]
    assert [s.id for s in a] != [s.id for s in select_samples(DATA, 12, 1)]
    assert sorted({s.task for s in a}) == sorted({"exist", "attribute", "count", "spatial", "choice", "digit"})
    assert all(sum(s.task == t for s in a) == 2 for t in {s.task for s in a})


def test_cli(tiny_llava, tmp_path, capsys):
    from quota_export.__main__ import main

    out = tmp_path / "r.yaml"
    assert main(["calibrate", "--model", str(tiny_llava), "--data", DATA, "--budget", "0.4",
                 "--samples", "2", "--name", "cli-r", "-o", str(out)]) == 0
    r = load_recipe(out)
    assert r.name == "cli-r" and r.pruning.budget == 0.4 and r.calibration.samples == 2
    assert "divergence" in capsys.readouterr().out
    assert main(["calibrate", "--model", str(tiny_llava), "--data", DATA, "--budget", "1.5", "-o", str(out)]) == 2


def test_weight_grid_default_is_w_grid_and_restriction_zeroes():
    from quota_export import UserError
    from quota_export.calibrate import MAXMIN, SIGNALS, W_GRID, Scorer, weight_grid

    assert weight_grid() == W_GRID and weight_grid(SIGNALS[::-1]) == W_GRID
    assert W_GRID[-1] == MAXMIN  # max-min selection: tried last, so ties keep the scorers
    for i, name in enumerate(SIGNALS):
        g = weight_grid(tuple(s for s in SIGNALS if s != name))
        scored = [s.weights for s in g if s != MAXMIN]
        assert scored and all(w[i] == 0.0 and sum(w) > 0 for w in scored) and len(set(g)) == len(g)
        assert (MAXMIN in g) == (name != "diversity")  # max-min is the diversity signal's set form
    assert weight_grid(("attention",)) == (Scorer((0.0, 1.0, 0.0, 0.0)),)
    assert weight_grid(("diversity",)) == (Scorer((0.0, 0.0, 0.0, 0.5)), Scorer((0.0, 0.0, 0.0, 1.0)),
                                           Scorer((0.0, 0.0, 0.0, 2.0)), MAXMIN)
    with pytest.raises(UserError, match="--signals: colour"):
        weight_grid(("colour",))


def test_start_vectors_follow_the_signals():
    from quota_export.calibrate import MAXMIN, STARTS, W_GRID, Scorer, start_vectors

    assert start_vectors() == STARTS and all(w in W_GRID for w in STARTS)
    assert start_vectors(("magnitude", "risk", "diversity")) == (Scorer((1.0, 0.0, 0.0, 0.0)),
                                                                  Scorer((0.0, 0.0, 0.0, 1.0)), MAXMIN)
    assert start_vectors(("attention", "risk")) == (Scorer((0.0, 1.0, 0.0, 0.0)),)
    assert start_vectors(("risk",)) == (Scorer((0.0, 0.0, 0.5, 0.0)),)  # no single-signal start: the grid's first


def test_signals_ablation_zero_weight_and_default_unchanged(calibrated, tiny_llava, tmp_path):
    """signals without attention -> every stage's attention weight is 0; all four signals given
    explicitly -> the default recipe, byte for byte."""
    (a, _), _ = calibrated
    r, _ = calibrate(tiny_llava, DATA, 0.3, "w4a4kv4", SAMPLES, seed=3, name="tiny-q",
                     signals=("magnitude", "attention", "risk", "diversity"))
    save_recipe(r, tmp_path / "explicit.yaml")
    assert (tmp_path / "explicit.yaml").read_bytes() == a.read_bytes()
    r, _ = calibrate(tiny_llava, DATA, 0.3, "w4a4kv4", SAMPLES, seed=3, name="tiny-q",
                     signals=("magnitude", "risk"))
    assert r.pruning.stages and all(s.weights.attention == 0.0 for s in r.pruning.stages)
    assert all(s.weights.magnitude + s.weights.risk > 0 for s in r.pruning.stages)
    assert "ablation: score weights restricted to magnitude, risk" in r.calibration.notes


def test_cli_signals(tiny_llava, tmp_path):
    from quota_export.__main__ import main

    out = tmp_path / "r.yaml"
    assert main(["calibrate", "--model", str(tiny_llava), "--data", DATA, "--budget", "0.4", "--samples", "2",
                 "--signals", "attention", "risk", "-o", str(out)]) == 0
    r = load_recipe(out)
    assert r.pruning.stages and all(s.weights.magnitude == 0.0 for s in r.pruning.stages)


def test_merge_default_and_ablation(calibrated, tiny_llava, tmp_path):
    """calibrate merges by default; --merge none writes merge: none and says so in the notes."""
    from quota_export.__main__ import main

    (a, _), _ = calibrated
    assert load_recipe(a).pruning.merge == "proportional"
    out = tmp_path / "r.yaml"
    assert main(["calibrate", "--model", str(tiny_llava), "--data", DATA, "--budget", "0.4", "--samples", "2",
                 "--merge", "none", "-o", str(out)]) == 0
    r = load_recipe(out)
    assert r.pruning.merge == "none" and "ablation: no merging of dropped tokens" in r.calibration.notes


def test_scorer_says_how_a_stage_selects():
    """A candidate stage's selection is explicit: a max-min scorer takes no weights, a top-k one needs some."""
    from quota_export.calibrate import MAXMIN, Scorer

    assert MAXMIN.select == "maxmin" and not any(MAXMIN.weights)
    with pytest.raises(ValueError):
        Scorer((0.0, 0.0, 0.0, 0.0))  # an all-zero top-k scorer would rank nothing
    with pytest.raises(ValueError):
        Scorer((1.0, 0.0, 0.0, 0.0), "maxmin")


def test_screen_batches_workers_and_focus(tiny_llava):
    """The screen's batched pieces (samples of one prompt shape as one tensor) give the exact view's
    bits; its last-layer shortcut stays within float noise; worker processes give the same values
    as one process; focus picks the samples a candidate disturbs most."""
    from quota_export import models
    from quota_export.calibrate import CandStage, Scorer
    from quota_export.calibrate.evaluator import View
    from quota_export.data import load_bench, load_image
    from quota_export.reference import DeployConfig, Deployed

    ad = models.load(tiny_llava)
    dep = Deployed(ad, DeployConfig.of("w4a4kv4", merge=True))
    prompts = [ad.prompt(load_image(s), s.question) for s in load_bench(DATA, limit=6)]
    assert len({p.input_ids.shape[1] for p in prompts}) < len(prompts)  # some batches hold several samples
    cands = [(CandStage(1, 40, Scorer((0.5, 1.0, 0.5, 1.0))), CandStage(3, 9, Scorer((0.0, 1.0, 0.0, 2.0)))),
             (CandStage(0, 30, Scorer((0.0, 0.0, 0.0, 1.0))),), (CandStage(2, 20, Scorer((1.0, 0.0, 0.0, 0.0))),)]
    with Evaluator(dep, prompts, layers=[0, 1, 2, 3]) as ev:
        want = ev.exact.divergence(cands)
        everyone = list(range(len(prompts)))
        whole = View(ev, dep, ev._batches(everyone), "batched")
        assert any(len(b.idx) > 1 for b in whole.batches)
        assert whole.divergence(cands) == want  # bit for bit
        assert whole.stage_sigmas(cands[0]) == ev.exact.stage_sigmas(cands[0])
        short = View(ev, dep, ev._batches(everyone), "short", last_only=True)
        assert short.divergence(cands) == pytest.approx(want, rel=1e-4)
        kls = ev.exact.per_sample(cands[0])
        top = ev.focus(cands[0], 2)
        assert top == sorted(sorted(everyone, key=lambda i: -kls[i])[:2]) and ev.screen.samples == top
        sub = View(ev, dep, ev._batches(top), "subset")  # the screen's sigmas are its samples' own
        assert ev.screen.divergence(cands) == pytest.approx(sub.divergence(cands), rel=1e-4)
    with Evaluator(dep, prompts, layers=[0, 1, 2, 3], workers=2) as ev2:
        assert [s.ref_logp.tolist() for s in ev2.samples] == [s.ref_logp.tolist() for s in ev.samples]
        assert ev2.exact.divergence(cands) == want  # chunks measured in two processes
