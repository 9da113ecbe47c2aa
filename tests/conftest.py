"""Shared fixtures: tiny random checkpoints of real HF architectures, saved like downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]


def make_tiny_llava(out: Path, seed: int = 0, layers: int = 4, hidden: int = 64, kv_heads: int | None = None) -> Path:
    """A random LlavaForConditionalGeneration with the shapes tokenizer/processor (96x96, 144 tokens).

    4 attention heads; `kv_heads` < 4 gives grouped-query attention (default: 4, plain MHA)."""
    from transformers import LlavaForConditionalGeneration

    from calib_data.shapes.model import build_config, build_processor, build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg = build_config(tok, vision_hidden=32, vision_layers=1, hidden=hidden, layers=layers, heads=4)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    if kv_heads is not None:
        cfg.text_config.num_key_value_heads = kv_heads
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # give text and image tokens comparable scale, as in the shipped model
        model.get_input_embeddings().weight.normal_(0, 1.0)
        model.model.multi_modal_projector.linear_2.weight.mul_(20.0)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    build_processor(tok).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "model")
