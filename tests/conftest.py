"""Shared fixtures: tiny random checkpoints of real HF architectures, saved like downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
TEST_SPLIT = ROOT / "calib_data" / "shapes" / "test.jsonl"  # the shipped test split
# a stage scored by all four signals (recipe weights + sigmas), for tests that want every signal on
S_WEIGHTED = {"weights": {"magnitude": 1.0, "attention": 1.0, "risk": 1.0, "diversity": 1.0},
              "sigma": {"magnitude": 10.0, "attention": 0.01, "risk": 1.0, "diversity": 0.5}}


def make_tiny_llava(out: Path, seed: int = 0, layers: int = 4, hidden: int = 64, kv_heads: int | None = None) -> Path:
    """A random LlavaForConditionalGeneration with the shapes tokenizer/processor (96x96, 144 tokens).

    4 attention heads; `kv_heads` < 4 gives grouped-query attention (default: 4, plain MHA)."""
    from calib_data.shapes.checkpoints import write_llava
    from calib_data.shapes.model import build_config, build_tokenizer

    tok = build_tokenizer()
    cfg = build_config(tok, vision_hidden=32, vision_layers=1, hidden=hidden, layers=layers, heads=4)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    if kv_heads is not None:
        cfg.text_config.num_key_value_heads = kv_heads
    return write_llava(out, cfg, seed, tok)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "model")


def make_tiny_qwen2_vl(out: Path, seed: int = 0, layers: int = 3, hidden: int = 64, kv_heads: int = 2,
                       patch: int = 8, image: int = 96, arch: str = "Qwen2VLForConditionalGeneration") -> Path:
    """A random Qwen2-VL (4 heads, `kv_heads` KV heads, head_dim 16, mrope_section [2,3,3]; vision
    depth 1, width 32, patch 8, merge 2) with a word-level tokenizer over the shapes vocabulary plus
    Qwen's special tokens, and a Qwen2-VL image processor fixed to image x image pixels: a 96x96
    shapes image -> grid [1,12,12] -> 144 patches -> 36 visual tokens. Saved like a download
    (config, safetensors, tokenizer + chat template, preprocessor_config.json, processor_config.json).

    Real Qwen2-VL uses patch 14 (sizes multiple of 28); the adapter reads patch and merge from the
    config, so patch 8 only keeps the shapes images at their size (no resize, no padding)."""
    from calib_data.shapes.checkpoints import qwen2_vl_config, qwen_tokenizer, write_qwen2_vl

    tok, vocab = qwen_tokenizer()
    if arch == "Qwen2VLForConditionalGeneration":
        vision = dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=4, mlp_ratio=4)
    else:
        vision = dict(depth=2, hidden_size=32, out_hidden_size=hidden, intermediate_size=64, num_heads=4,
                      window_size=4 * patch, fullatt_block_indexes=[1])
    text = dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=160, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    cfg = qwen2_vl_config(vocab, text, dict(patch_size=patch, **vision), arch)
    return write_qwen2_vl(out, cfg, seed, tok, image)


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl") / "model")


def make_tiny_llava_next(out: Path, seed: int = 1, layers: int = 3, hidden: int = 64, kv_heads: int = 4,
                         crop: int = 48, patch: int = 8, pinpoint: tuple[int, int] = (96, 96)) -> Path:
    """A random LlavaNextForConditionalGeneration (CLIP tower: crop 48, patch 8, width 32, depth 1;
    Llama decoder: 4 heads, head_dim 16) with the shapes word-level tokenizer and a LLaVA-NeXT
    processor (PIL image processor) whose single grid pinpoint is the declared image size 96x96:
    a shapes image -> 1 base crop (the image resized to 48x48) + 2x2 anyres crops of 48x48 (no
    resize, no padding) -> pixel_values [1,5,3,48,48] -> 36 base + 12*12 grid + 12 newline = 192
    visual tokens. Saved like a download (config, safetensors, tokenizer, preprocessor_config.json,
    processor_config.json + chat template)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from calib_data.shapes.model import CHAT_TEMPLATE, CLIP_MEAN, CLIP_STD, build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    pin = [list(pinpoint)]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                              image_size=crop, patch_size=patch, projection_dim=32, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=160, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                       rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                       pad_token_id=vocab["<pad>"], tie_word_embeddings=False)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                          image_grid_pinpoints=pin, projector_hidden_act="gelu",
                          vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=False)
    cfg.architectures = ["LlavaNextForConditionalGeneration"]
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # comparable scale for text and image tokens (incl. the newline embedding)
        model.get_input_embeddings().weight.normal_(0, 1.0)
        model.model.multi_modal_projector.linear_2.weight.mul_(80.0)
        model.model.image_newline.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 0.3)
        for layer in model.model.language_model.layers:  # layers that matter next to the embeddings:
            layer.self_attn.q_proj.weight.mul_(4.0)      # answers then depend on the image
            layer.self_attn.k_proj.weight.mul_(4.0)
            layer.self_attn.o_proj.weight.mul_(20.0)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    ip = LlavaNextImageProcessorPil(
        do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True, do_pad=True, do_convert_rgb=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, size={"height": crop, "width": crop},
        crop_size={"height": crop, "width": crop}, image_grid_pinpoints=pin,
    )
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_llava_next(tmp_path_factory.mktemp("tiny_llava_next") / "model")


@pytest.fixture(scope="session")
def samples():
    """(image, question) of the first 3 samples of the shipped test split (the family tests' inputs)."""
    from quota_export.data import load_bench, load_image

    return [(load_image(s), s.question) for s in load_bench(ROOT / "calib_data" / "shapes" / "test.jsonl", limit=3)]


def assert_generate_matches_hf(adapter, samples, hf_inputs, new_tokens: int = 6) -> None:
    """The unquantized, unpruned reference's greedy tokens equal HF generate's on every sample
    (up to the reference's EOS), and the answers are not all the same token."""
    from quota_export.reference import DeployConfig, Deployed

    dep = Deployed(adapter, DeployConfig())
    answers = set()
    for img, q in samples:
        p = adapter.prompt(img, q)
        toks, _ = dep.generate(p, new_tokens)
        with torch.no_grad():
            g = adapter.model.generate(**hf_inputs(p), attention_mask=torch.ones_like(p.input_ids),
                                       max_new_tokens=new_tokens, do_sample=False)
        hf = g[0, p.input_ids.shape[1]:].tolist()
        assert toks == hf[: len(toks)] and (len(toks) == len(hf) or toks[-1] == dep.spec.eos_token_id)
        answers.add(tuple(toks))
    assert len(answers) > 1 or len(set(answers.pop())) > 1, "degenerate answers prove little"


def vision_graph_run(adapter, sample):
    """(vision.onnx inputs as [(name, dims)], its output on the sample, the tower's own features)."""
    import onnxruntime as ort

    from quota_export.lower.onnx_target import vision_graph

    m = vision_graph(adapter, 21)
    inputs = [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in m.graph.input]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    p = adapter.prompt(*sample)
    y = s.run(None, {"pixel_values": p.pixel_values.numpy()})[0]
    return inputs, y, adapter.vision_features(p.pixel_values).numpy()
