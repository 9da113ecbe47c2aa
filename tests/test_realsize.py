"""Real-size checkpoints (issue #21): half-precision weights, graphs over 2 GiB (external data),
and images of any size for fixed-resolution families."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, make_tiny_llava
from quota_export.__main__ import main
from quota_export.build import build
from quota_export.recipe import load_recipe

TEST_SPLIT = ROOT / "calib_data" / "shapes" / "test.jsonl"
SAMPLES = 4
ONNX = ("vision.onnx", "embed.onnx", "prefill.onnx", "decode.onnx")


def write_recipe(path: Path, model: Path, name: str = "tiny") -> Path:
    doc = {"name": name, "model": str(model), "quant": {"scheme": "w4a4kv4"},
           "pruning": {"budget": 0.55, "n_visual": 144, "stages": [{"layer": 1, "keep": 72}, {"layer": 3, "keep": 20}]},
           "export": {"max_new_tokens": 4}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def assert_parity(man: dict) -> None:
    p = man["parity"]
    assert p["kept_index_agreement_per_stage"] == [1.0] * len(man["schedule"])
    assert p["answer_agreement"] == 1.0
    assert p["logits_sqnr_db_min"] == "inf" or p["logits_sqnr_db_min"] >= 40.0, p


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- half-precision checkpoints


@pytest.fixture(scope="module")
def half_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny LLaVA saved in bf16 and fp16, and the fp32 upcast of each (same values)."""
    from transformers import LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("half")
    src = make_tiny_llava(root / "fp32")
    out = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for upcast in (False, True):
            d = root / (f"{name}-up32" if upcast else name)
            shutil.copytree(src, d)
            m = LlavaForConditionalGeneration.from_pretrained(src).to(dt)
            (m.float() if upcast else m).save_pretrained(d)
            out[d.name] = d
    return out


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_checkpoint_builds_like_its_fp32_upcast(half_models, dtype, tmp_path, capsys):
    """A bf16 / fp16 checkpoint keeps its dtype in memory for the decoder, builds with full parity,
    and gives the same ONNX bytes (hence the same answers) as its fp32 upcast."""
    from quota_export import models

    a = models.load(half_models[dtype])
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert a.layers()[0].self_attn.q_proj.weight.dtype == want  # the decoder is not upcast at load
    assert a.lm_head().weight.dtype == want
    assert {p.dtype for p in a.model.model.vision_tower.parameters()} == {torch.float32}

    res = build(load_recipe(write_recipe(tmp_path / "h.yaml", half_models[dtype])), tmp_path / "h",
                str(TEST_SPLIT), SAMPLES, threads=1)
    up = build(load_recipe(write_recipe(tmp_path / "u.yaml", half_models[f"{dtype}-up32"])), tmp_path / "u",
               str(TEST_SPLIT), SAMPLES, threads=1)
    assert_parity(res.manifest)
    assert {g: sha(res.out / g) for g in ONNX} == {g: sha(up.out / g) for g in ONNX}
    assert res.manifest["parity"] == up.manifest["parity"]

    from quota_export.data import load_bench

    s = load_bench(TEST_SPLIT, limit=1)[0]
    answers = []
    for out in (res.out, up.out):
        assert main(["run", "--artifacts", str(out), "--image", s.image, "--prompt", s.question]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] and answers[0] == answers[1]
