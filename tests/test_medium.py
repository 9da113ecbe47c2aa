"""A medium checkpoint end to end (issue #21): calibrate -> build -> verify on a bf16 LLaVA with
the real visual-token count (CLIP-style 336 px, patch 14: 576 tokens), 8 decoder layers with
grouped-query attention and a 32064-token vocabulary (~22 M parameters), with the external-data
threshold lowered so that the decoder graphs are written as .onnx + .onnx.data. It keeps the
paths a real-size model takes (half-precision loading, resized images, external data, long
prompts) exercised in the suite at a size that runs in minutes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TEST_SPLIT

from quota_export.__main__ import main

pytestmark = pytest.mark.slow

MiB = 1 << 20


def make_medium_llava(out: Path, seed: int = 0) -> Path:
    """Random LLaVA-1.5 layout in bf16 on disk: a 1-block CLIP tower at 336x336 (patch 14 -> 576
    visual tokens), Llama hidden 256, 8 layers, 4 heads, 2 KV heads, vocab 32064; the shapes
    tokenizer and chat template; an image processor that resizes any image to 336x336."""
    from transformers import LlavaForConditionalGeneration

    from calib_data.shapes.model import build_config, build_processor, build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    tok.model_max_length = 2048
    cfg = build_config(tok, vision_hidden=32, vision_layers=1, hidden=256, layers=8, heads=4)
    cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.image_seq_length = 336, 14, 576
    cfg.text_config.num_key_value_heads = 2
    cfg.text_config.vocab_size = 32064
    cfg.text_config.max_position_embeddings = 1024
    cfg.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # comparable scale for text and image tokens, as in the shipped model
        model.get_input_embeddings().weight.normal_(0, 1.0)
        model.model.multi_modal_projector.linear_2.weight.mul_(20.0)
        model.lm_head.weight[len(tok):].zero_()  # ids past the shapes vocabulary: never the answer
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    proc = build_processor(tok)
    proc.patch_size = 14
    proc.image_processor.do_resize = True
    proc.image_processor.size = proc.image_processor.crop_size = {"height": 336, "width": 336}
    proc.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """The checkpoint, a recipe calibrated on it, and a build of that recipe with external data."""
    from quota_export.lower import external

    root = tmp_path_factory.mktemp("medium")
    model = make_medium_llava(root / "model")
    recipe = root / "r.yaml"
    assert main(["calibrate", "--model", str(model), "--data", str(TEST_SPLIT), "--budget", "0.3",
                 "--samples", "2", "--seed", "5", "-o", str(recipe)]) == 0  # fmt: skip
    doc = yaml.safe_load(recipe.read_text())
    doc["export"]["max_seq"] = 768  # the 587-token prompts and the answer
    doc["export"]["max_new_tokens"] = 4
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    mp = pytest.MonkeyPatch()
    mp.setattr(external, "EXTERNAL_DATA_BYTES", 16 * MiB)  # decoder graphs (~33 MB each) go external
    try:
        assert main(["build", "--recipe", str(recipe), "--out", str(root / "g"), "--bench", str(TEST_SPLIT),
                     "--samples", "2"]) == 0  # fmt: skip
    finally:
        mp.undo()
    return model, recipe, root / "g"


def test_medium_checkpoint_is_bf16_on_disk_and_in_memory(medium):
    from safetensors import safe_open

    from quota_export import models

    model, _, _ = medium
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    a = models.load(model)
    assert a.decoder_spec().num_layers == 8 and a.n_visual() == 576
    assert a.model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_medium_calibrates_a_schedule_within_budget(medium):
    _, recipe, _ = medium
    doc = yaml.safe_load(recipe.read_text())
    p = doc["pruning"]
    assert p["n_visual"] == 576 and p["stages"], p
    kept = [576] * 8
    for st in p["stages"]:
        kept[st["layer"]:] = [st["keep"]] * (8 - st["layer"])
    assert sum(kept) / (8 * 576) <= p["budget"] + 1e-9
    assert doc["calibration"]["samples"] == 2 and doc["calibration"]["divergence"] >= 0


def test_medium_build_is_exact_with_external_data(medium):
    _, _, out = medium
    man = json.loads((out / "manifest.json").read_text())
    p = man["parity"]
    assert p["kept_index_agreement_per_stage"] == [1.0] * len(man["schedule"])
    assert p["answer_agreement"] == 1.0 and (p["logits_sqnr_db_min"] == "inf" or p["logits_sqnr_db_min"] >= 40.0)
    ext = {g: info.get("external_data") for g, info in man["graphs"].items()}
    assert ext["prefill.onnx"] == "prefill.onnx.data" and ext["decode.onnx"] == "decode.onnx.data"
    assert ext["vision.onnx"] is None  # under the threshold: one file
    for d in filter(None, ext.values()):
        assert man["files"][d]["bytes"] == (out / d).stat().st_size > 16 * MiB


def test_medium_verifies_and_runs(medium, tmp_path, capsys):
    from quota_export.data import load_bench, load_image
    from quota_export.runtime.ort import OrtRunner

    _, _, out = medium
    assert main(["verify", "--artifacts", str(out), "--bench", str(TEST_SPLIT), "--samples", "2",
                 "--json", str(tmp_path / "v.json")]) == 0  # fmt: skip
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["answer_agreement"] == 1.0, v
    s = load_bench(TEST_SPLIT, limit=1)[0]
    capsys.readouterr()
    assert main(["run", "--artifacts", str(out), "--image", s.image, "--prompt", s.question]) == 0
    text = capsys.readouterr().out
    assert text.strip() and text == OrtRunner(out, threads=1).generate(load_image(s), s.question).text + "\n"
