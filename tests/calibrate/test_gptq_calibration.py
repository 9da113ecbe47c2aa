"""GPTQ weights calibrated on the pruned, quantized streams: calibrate --weights gptq writes them
beside the recipe; build / verify / eval read them; a bad file is one error line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TEST_SPLIT, make_tiny_llava

from quota_export.__main__ import main

pytestmark = pytest.mark.slow  # GPTQ calibration runs (~40 s together)

torch.set_num_threads(1)
CALIB = ROOT / "calib_data" / "shapes" / "calib.jsonl"
WFILE = "r.weights.safetensors"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("gptq_model") / "model", seed=5)


@pytest.fixture(scope="module")
def calibrated(model, tmp_path_factory) -> list[Path]:
    """The same GPTQ calibration twice, each into its own folder as r.yaml."""
    outs = []
    for i in range(2):
        d = tmp_path_factory.mktemp(f"gptq{i}")
        assert main(["calibrate", "--model", str(model), "--data", str(CALIB), "--budget", "0.5", "--samples", "4",
                     "--weights", "gptq", "-o", str(d / "r.yaml")]) == 0  # fmt: skip
        outs.append(d / "r.yaml")
    return outs


def test_same_inputs_same_bytes(calibrated):
    a, b = calibrated
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / WFILE).read_bytes() == (b.parent / WFILE).read_bytes()


def test_recipe_names_the_file_and_it_loads(calibrated, model):
    from safetensors import safe_open

    from quota_export.build import load_deployed
    from quota_export.recipe import load_recipe
    from quota_export.reference import rtn_weights

    r = load_recipe(calibrated[0])
    w = r.resolved_quant().weights
    assert (w.algorithm, w.calibrated) == ("gptq", WFILE)
    assert r.weights_path() == (calibrated[0].parent / WFILE).resolve()
    assert "GPTQ" in r.calibration.notes
    ad, dep = load_deployed(r)
    rtn = rtn_weights(ad, dep.cfg)
    assert set(dep.qweights) == set(rtn) and len(rtn) == 4 * 7
    name = "model.language_model.layers.1.mlp.down_proj"
    g = dep.qweights[name]
    assert g.q.dtype == torch.int8 and g.scale.dtype == torch.float32 and g.zero_point is None
    assert g.q.shape == rtn[name].q.shape and g.scale.shape == rtn[name].scale.shape
    assert not torch.equal(g.q, rtn[name].q)  # not RTN in disguise
    with safe_open(str(calibrated[0].parent / WFILE), framework="pt") as f:
        meta = json.loads(f.metadata()["quota_export"])
    assert (meta["bits"], meta["group_size"], meta["symmetric"], meta["act_bits"]) == (4, 32, True, 4)
    assert meta["calibrated_on"]["schedule"] == [[s.layer, s.keep] for s in r.pruning.stages]


def test_gptq_beats_rtn_on_the_pruned_streams(calibrated, model):
    """Layer-wise output error on the streams the pruned quantized model produces, and those streams
    are exactly Deployed.prefill's."""
    from quota_export import models
    from quota_export.calibrate import select_samples
    from quota_export.data import load_image
    from quota_export.gptq_calibrate import gptq_weights, initial_states, step
    from quota_export.recipe import load_recipe
    from quota_export.reference import DeployConfig, Deployed, rmsnorm

    r = load_recipe(calibrated[0])
    ad = models.load(model)
    cfg = DeployConfig.from_recipe(r)
    prompts = [ad.prompt(load_image(s), s.question) for s in select_samples(CALIB, 4, 0)]
    res = gptq_weights(ad, cfg, r.resolved_quant().weights, prompts)
    assert len(res.stats) == 28
    assert all(g < rtn for g, rtn in res.stats.values()), res.stats
    assert res.error_ratio() < 0.5
    dep = Deployed(ad, cfg, res.qweights)
    states = initial_states(dep, prompts)
    for l in range(dep.spec.num_layers):
        states = [step(dep, l, s) for s in states]
    for st, p in zip(states, prompts):
        assert st.n == r.pruning.stages[-1].keep
        logits = rmsnorm(st.h[:, -1], dep.norm, dep.spec.rms_eps, dep.hp) @ dep.lm_head.T
        ref = dep.prefill(dep.embed_prompt(p), p.positions(), p.visual_start, p.n_visual).logits
        assert torch.equal(logits, ref)


def test_build_verify_with_gptq_weights(calibrated, tmp_path, capsys):
    d = Path(shutil.copytree(calibrated[0].parent, tmp_path / "rec"))
    rp = d / "r.yaml"
    doc = yaml.safe_load(rp.read_text())
    doc["export"]["max_new_tokens"] = 3
    rp.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "graphs"
    rc = main(["build", "--recipe", str(rp), "--out", str(out), "--bench", str(TEST_SPLIT), "--samples", "4"])
    assert rc == 0, capsys.readouterr().err
    assert (out / WFILE).read_bytes() == (d / WFILE).read_bytes()  # travels with recipe.yaml
    rc = main(["verify", "--artifacts", str(out), "--bench", str(TEST_SPLIT), "--samples", "6",
               "--json", str(tmp_path / "v.json")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["kept_index_agreement"] == 1.0 and v["answer_agreement"] == 1.0


def test_eval_reads_the_weights_and_stagewise_gptq(calibrated, model):
    from quota_export import UserError
    from quota_export.evaluate import Harness
    from quota_export.recipe import load_recipe

    h = Harness(model, TEST_SPLIT, samples=2, max_new_tokens=2, calib=CALIB, calib_samples=2)
    m = h.evaluate("quota", recipe=load_recipe(calibrated[0]))
    assert m["samples"] == 2
    dep = h.deployed("w4a4kv4-gptq")
    assert not torch.equal(dep.W[0]["mlp.up_proj"], h.deployed("w4a4kv4").W[0]["mlp.up_proj"])
    assert h.evaluate("fastv", "w4a4kv4-gptq", 0.5)["samples"] == 2
    with pytest.raises(UserError, match="--calib"):
        Harness(model, TEST_SPLIT, samples=2).deployed("w4a4kv4-gptq")


# ---------------------------------------------------------------- bad weights files


def _damaged(recipes, tmp_path, edit=None, **weights_over) -> Path:
    """A copy of the calibrated recipe + weights; `edit(path)` damages the weights file."""
    d = Path(shutil.copytree(recipes[0].parent, tmp_path / "rec"))
    if weights_over:
        doc = yaml.safe_load((d / "r.yaml").read_text())
        doc["quant"]["weights"].update(weights_over)
        (d / "r.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    if edit is not None:
        edit(d / WFILE)
    return d / "r.yaml"


def _rewrite(drop=None, change=None):
    def edit(path):
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        for k in [k for k in t if drop and k.startswith(drop)]:
            del t[k]
        if change:
            change(t)
        save_file(t, str(path), metadata=meta)

    return edit


def _build_error(capsys, tmp_path, rp, *needles) -> str:
    rc = main(["build", "--recipe", str(rp), "--out", str(tmp_path / "out"), "--bench", str(TEST_SPLIT),
               "--samples", "2"])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err and err[-1].startswith("error: "), err
    assert all(ln.startswith("[") or ln.startswith("      ") for ln in err[:-1]), err
    for n in needles:
        assert n in err[-1], err[-1]
    assert not (tmp_path / "out").exists()
    return err[-1]


FIELD = "quant.weights.calibrated"
DOWN1 = "model.language_model.layers.1.mlp.down_proj"


def test_missing_weights_file(calibrated, tmp_path, capsys):
    rp = _damaged(calibrated, tmp_path, edit=lambda p: p.unlink())
    _build_error(capsys, tmp_path, rp, FIELD, WFILE, "no such weights file")


def test_truncated_weights_file(calibrated, tmp_path, capsys):
    def cut(p):
        b = p.read_bytes()
        p.write_bytes(b[: len(b) // 2])

    _build_error(capsys, tmp_path, _damaged(calibrated, tmp_path, edit=cut), FIELD, WFILE, "not a readable safetensors")


def test_weights_file_without_metadata(calibrated, tmp_path, capsys):
    def strip(p):
        from safetensors.torch import load_file, save_file

        save_file(load_file(str(p)), str(p))

    _build_error(capsys, tmp_path, _damaged(calibrated, tmp_path, edit=strip), FIELD, "not a quota_export weights file")


def test_weights_file_missing_a_module(calibrated, tmp_path, capsys):
    rp = _damaged(calibrated, tmp_path, edit=_rewrite(drop=DOWN1 + "."))
    _build_error(capsys, tmp_path, rp, FIELD, WFILE, "missing 1 module", DOWN1)


def test_weights_file_wrong_shape(calibrated, tmp_path, capsys):
    def change(t):
        t[DOWN1 + ".scale"] = t[DOWN1 + ".scale"][:, :1].contiguous()

    rp = _damaged(calibrated, tmp_path, edit=_rewrite(change=change))
    _build_error(capsys, tmp_path, rp, FIELD, f"{DOWN1}.scale", "float32")


def test_weights_file_off_the_exact_grid(calibrated, tmp_path, capsys):
    def change(t):
        t[DOWN1 + ".scale"] = t[DOWN1 + ".scale"] * 1.1

    rp = _damaged(calibrated, tmp_path, edit=_rewrite(change=change))
    _build_error(capsys, tmp_path, rp, FIELD, f"{DOWN1}.scale", "exact-accumulation grid")


def test_weights_file_for_another_group_size(calibrated, tmp_path, capsys):
    rp = _damaged(calibrated, tmp_path, group_size=16)
    _build_error(capsys, tmp_path, rp, FIELD, "made for group_size 32, the recipe has 16")


def test_weights_file_for_other_bits(calibrated, tmp_path, capsys):
    rp = _damaged(calibrated, tmp_path, bits=8)
    _build_error(capsys, tmp_path, rp, FIELD, "made for bits 4, the recipe has 8")


def test_weights_file_for_another_model(calibrated, tmp_path, capsys):
    other = make_tiny_llava(tmp_path / "other", seed=6)
    capsys.readouterr()  # the model writer's progress bar
    d = Path(shutil.copytree(calibrated[0].parent, tmp_path / "rec"))
    doc = yaml.safe_load((d / "r.yaml").read_text())
    doc["model"] = str(other)
    (d / "r.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    _build_error(capsys, tmp_path, d / "r.yaml", FIELD, "made for other weights")


def test_gptq_recipe_without_weights_file(calibrated, tmp_path, capsys):
    rp = _damaged(calibrated, tmp_path, calibrated=None)
    _build_error(capsys, tmp_path, rp, FIELD, "calibrate --weights gptq")


@pytest.mark.parametrize("value, needle", [
    ("w/r.weights.safetensors", "no folders"),
    ("r.weights.bin", ".safetensors file"),
])
def test_calibrated_field_validation(calibrated, tmp_path, capsys, value, needle):
    rp = _damaged(calibrated, tmp_path, calibrated=value)
    _build_error(capsys, tmp_path, rp, str(rp), FIELD, needle)


def test_calibrated_field_needs_gptq(calibrated, tmp_path, capsys):
    rp = _damaged(calibrated, tmp_path, algorithm="rtn")
    _build_error(capsys, tmp_path, rp, str(rp), FIELD, "algorithm gptq only")
