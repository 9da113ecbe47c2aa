"""The shipped model: loads through the HF auto classes like a download, its config matches the
model card, and a task-balanced slice of the test split is answered well above chance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "shapes-llava"
TEST = ROOT / "calib_data" / "shapes" / "test.jsonl"

# Chance on the 60-sample slice (10 per task): exist 0.5, attribute ~1/6, count ~0.39 (majority
# answer), spatial 0.25, choice 0.25, digit 0.1 -> ~0.28 overall.
CHANCE = 0.28
# The shipped model (step 26000) scores 0.933 on this slice (10 samples a task: count 0.8 and
# spatial 0.8 here, the rest 1.0; see the model card for the full test split). The step-24000
# model, which failed spatial relations, scored 0.82 (spatial 0.2), below this bound.
MIN_OVERALL = 0.88


def test_loads_with_auto_classes():
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    cfg = AutoConfig.from_pretrained(MODEL)
    assert cfg.architectures == ["LlavaForConditionalGeneration"]
    assert cfg.text_config.num_hidden_layers >= 6
    model = LlavaForConditionalGeneration.from_pretrained(MODEL)
    proc = AutoProcessor.from_pretrained(MODEL)
    from PIL import Image

    from quota_export.data import load_bench

    s = load_bench(TEST, limit=1)[0]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    enc = proc(images=Image.open(s.image).convert("RGB"), text=text, return_tensors="pt")
    assert int((enc["input_ids"] == cfg.image_token_index).sum()) == 144  # >= 144 visual tokens
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


@pytest.mark.slow
def test_slice_accuracy_above_chance():
    from quota_export.evaluate import Harness

    torch.set_num_threads(1)
    h = Harness(MODEL, TEST, samples=60)
    m = h.evaluate("fp")
    assert m["overall"] >= MIN_OVERALL > CHANCE, m
