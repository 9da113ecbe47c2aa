"""Benchmark harness: runs on a tiny slice, JSON keys, scoring and retention arithmetic."""

from __future__ import annotations

import json
import math

import pytest
import torch

from quota_export.evaluate import (
    JSON_KEYS,
    choice_letter,
    is_correct,
    mean_kl,
    per_task_accuracy,
    retention,
)

torch.set_num_threads(1)
BENCH = "calib_data/shapes/test.jsonl"


def test_retention_arithmetic():
    fp = {"a": 0.8, "b": 0.5, "c": 0.0}
    got = {"a": 0.4, "b": 0.5, "c": 0.3}
    assert retention(got, fp) == pytest.approx((0.5 + 1.0) / 2)  # task c: FP 0 -> not counted
    assert retention(fp, fp) == 1.0
    assert math.isnan(retention(got, {"c": 0.0}))
    assert per_task_accuracy(["a", "b", "a", "a"], [True, False, False, True]) == {"a": 2 / 3, "b": 0.0}


def test_scoring_rules():
    assert is_correct(" Yes ", "yes") and not is_correct("yes no", "yes")
    opts = ["red", "green", "blue", "cyan"]
    assert is_correct("C", "C", opts) and is_correct("c .", "C", opts) and is_correct("blue", "C", opts)
    assert not is_correct("red", "C", opts) and choice_letter("purple", opts) is None


def test_mean_kl():
    a = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64), -1)
    assert mean_kl(a, a) == pytest.approx(0.0, abs=1e-15)
    b = torch.log_softmax(torch.zeros(2, 3, dtype=torch.float64), -1)
    assert mean_kl(a, b) > 0


def test_eval_cli_tiny_slice(tiny_llava, tmp_path, capsys):
    from quota_export.__main__ import main

    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(tiny_llava), "--bench", BENCH, "--method", "fastv", "--quant", "w4a4kv4",
               "--budget", "0.3", "--samples", "6", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert tuple(d) == JSON_KEYS
    assert set(d["per_task"]) == {"exist", "attribute", "count", "spatial", "choice", "digit"}
    assert d["kl"] >= 0 and 0 <= d["agreement"] <= 1
    assert "retention" in capsys.readouterr().out


@pytest.mark.slow
def test_harness_methods(tiny_llava, tmp_path):
    from quota_export.calibrate import calibrate
    from quota_export.evaluate import Harness

    h = Harness(tiny_llava, BENCH, samples=4)
    fp = h.evaluate("fp")
    assert fp["agreement"] == 1.0 and fp["kl"] == pytest.approx(0.0, abs=1e-12) and fp["mean_kept"] == 1.0
    assert h.fp_reference() is h.fp_reference()  # cached
    for m in ("random", "divprune"):
        r = h.evaluate(m, "w4a4kv4", 0.3)
        assert r["mean_kept"] <= 0.3
    recipe, _ = calibrate(tiny_llava, "calib_data/shapes/calib.jsonl", 0.3, "w4a4kv4", 2, 0)
    q = h.evaluate("quota", recipe=recipe)
    assert q["mean_kept"] <= 0.3 and q["kl"] >= 0
    blank = h.run("none", "w4a4kv4", blank=True)
    assert len(blank.answers) == 4
    with pytest.raises(Exception, match="needs --budget"):
        h.run("pdrop", "w4a4kv4")


def test_blank_image_shapes(tiny_llava):
    from calib_data.shapes import make_scene, render
    from quota_export import models
    from quota_export.evaluate import blank_image

    ad = models.load(tiny_llava)
    import numpy as np

    assert np.array_equal(blank_image(ad, BENCH), render(make_scene(5), blank=True))
    assert not blank_image(ad, "/tmp/elsewhere/b.jsonl").any()


def test_stagewise_merge(tiny_llava, capsys):
    from quota_export.__main__ import main
    from quota_export.evaluate import Harness
    from quota_export.prune import baselines

    h = Harness(tiny_llava, BENCH, samples=2)
    plain = h.run("fastv", "w4a4kv4", 0.3)
    merged = h.run("fastv", "w4a4kv4", 0.3, merge=True)
    assert merged.mean_kept == plain.mean_kept  # the same tokens are kept ...
    assert not torch.equal(merged.first_logp, plain.first_logp)  # ... but the dropped ones still count
    dep = h.deployed("w4a4kv4")
    view = baselines.restaged(dep, [(2, 10)], merge=True)
    assert view.cfg.merge and not dep.cfg.merge and view.qweights is dep.qweights  # a view; dep untouched
    rc = main(["eval", "--model", str(tiny_llava), "--bench", BENCH, "--method", "none", "--quant", "w4a4kv4",
               "--samples", "2", "--merge"])
    assert rc != 0
    assert "--merge applies to the stage-wise baselines, not none" in capsys.readouterr().err


def test_paired_bootstrap():
    """benchmarks/paired.py: point values equal the harness's retention formula; identical methods
    measure no difference; a method right on many more samples is found better, with an interval
    that excludes 0; methods measured on other samples are refused."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    from quota_export.evaluate import per_task_accuracy, retention

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "paired.py"
    spec = importlib.util.spec_from_file_location("paired", path)
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)
    rng = np.random.default_rng(1)
    tasks = [t for t in ("exist", "count", "digit") for _ in range(100)]
    fp = list(rng.random(300) < 0.9)

    def side(p_correct):
        c = [bool(f and r < p_correct) for f, r in zip(fp, rng.random(300))]
        return {"tasks": tasks, "correct": c, "fp_correct": fp, "agree": c, "kl": list(rng.random(300) * (1 - p_correct))}

    a, b = side(0.95), side(0.6)
    r = paired.paired(a, b, boot=300)
    want = retention(per_task_accuracy(tasks, a["correct"]), per_task_accuracy(tasks, fp))
    assert abs(r["a"][0] - want) < 1e-12
    lo, hi = np.percentile(r["boot"][:, 0], [2.5, 97.5])
    assert lo > 0 and paired.verdict(r["diff"][0], lo, hi, True) == "A better"
    klo, khi = np.percentile(r["boot"][:, 2], [2.5, 97.5])
    assert paired.verdict(r["diff"][2], klo, khi, False) == "A better"  # lower KL is better
    same = paired.paired(a, a, boot=300)
    assert same["diff"] == (0.0, 0.0, 0.0) and not same["boot"].any() and same["only_a"] == same["only_b"] == 0
    assert paired.verdict(0.0, 0.0, 0.0, True).startswith("no difference")
    with pytest.raises(ValueError, match="same samples"):
        paired.paired(a, {**b, "tasks": tasks[::-1]}, boot=100)
