"""Random-weight checkpoints of real HF architectures with the shapes tokenizer, saved like downloads.

Shared by the tests' tiny models (tests/conftest.py) and the real-geometry checkpoints of
benchmarks/scale.py: the model is HF's own class built from a config (HF init), a few weights are
rescaled so that text and image tokens have comparable scale and answers depend on the image, and
the folder gets the tokenizer, chat template and image processor a download would have.

    llava_config(...)      LlavaConfig over the shapes tokenizer (any CLIP / Llama geometry; the
                           shipped model's own is calib_data.shapes.model.build_config)
    qwen2_vl_config(...)   Qwen2VLConfig / Qwen2_5_VLConfig over the Qwen-style shapes tokenizer
    write_llava(out, cfg, seed, ...)      model + tokenizer + LlavaProcessor
    write_qwen2_vl(out, cfg, seed, ...)   model + tokenizer + Qwen2-VL image processor

`dtype` builds and saves the model in that dtype (bf16 as real checkpoints ship): HF init runs
in it, so a 7B model never exists in float32.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from calib_data.shapes.model import CLIP_MEAN, CLIP_STD, build_processor, build_tokenizer

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>", "<unk>"]
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)
SHARD = "2GB"  # safetensors shard size: bounds the copy save_pretrained makes of one shard


@contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def llava_config(tok, vision: dict, text: dict):
    """A LlavaConfig over the shapes tokenizer: CLIP tower fields `vision` (hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads, image_size, patch_size) and Llama
    fields `text` (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, vocab_size, ...); the rest as in `build_config` (the shipped model's)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v = tok.get_vocab()
    vc = CLIPVisionConfig(**{"projection_dim": vision["hidden_size"], "hidden_act": "quick_gelu", **vision})
    tc = LlamaConfig(**{"vocab_size": len(v), "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                        "rope_theta": 10000.0, "bos_token_id": v["<s>"], "eos_token_id": v["</s>"],
                        "pad_token_id": v["<pad>"], "tie_word_embeddings": False, **text})
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=v["<image>"],
                      image_seq_length=(vc.image_size // vc.patch_size) ** 2, projector_hidden_act="gelu",
                      vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=False)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def write_llava(out: Path, cfg, seed: int, tok=None, dtype=torch.float32, projector_scale: float = 20.0,
                resize: bool = False) -> Path:
    """A random LlavaForConditionalGeneration of `cfg` (HF init under `seed`) with text embeddings
    N(0, 1) and the projector's output layer x `projector_scale` (text and image tokens of
    comparable scale, as in the shipped model). `resize`: the image processor resizes any image
    to the tower's size (shortest edge, center crop, bicubic) as LLaVA-1.5's does; else it takes
    the tower's size only (the shipped shapes processor)."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tok = tok or build_tokenizer()
    with _default_dtype(dtype):
        model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
        model.model.multi_modal_projector.linear_2.weight.mul_(projector_scale)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=SHARD)
    del model
    tok.save_pretrained(out)
    proc = build_processor(tok)
    s = cfg.vision_config.image_size
    if resize:
        proc.image_processor = CLIPImageProcessor(
            do_resize=True, size={"shortest_edge": s}, resample=3, do_center_crop=True,
            crop_size={"height": s, "width": s}, do_rescale=True, do_normalize=True,
            image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
        )
    proc.patch_size = cfg.vision_config.patch_size
    proc.save_pretrained(out)
    return out


def qwen_tokenizer():
    """A word-level tokenizer over the shapes vocabulary plus Qwen's special tokens, with a
    Qwen-style chat template. Returns (tokenizer, vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from calib_data.shapes.scene import vocabulary

    vocab = {w: i for i, w in enumerate(QWEN_SPECIALS + vocabulary())}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="<|im_end|>", unk_token="<unk>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
        model_max_length=512,
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok, vocab


def qwen2_vl_config(vocab: dict, text: dict, vision: dict, arch: str = "Qwen2VLForConditionalGeneration"):
    """A Qwen2-VL (or Qwen2.5-VL) config: `text` and `vision` are the text_config / vision_config
    fields (sizes), the token ids come from `vocab`."""
    if arch == "Qwen2VLForConditionalGeneration":
        from transformers import Qwen2VLConfig as Config
    else:
        from transformers import Qwen2_5_VLConfig as Config
    text = dict(bos_token_id=None, eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"],
                tie_word_embeddings=False, **text)
    cfg = Config(
        text_config=text, vision_config=dict(spatial_merge_size=2, temporal_patch_size=2, in_channels=3, **vision),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    cfg.architectures = [arch]
    return cfg


def write_qwen2_vl(out: Path, cfg, seed: int, tok, image: int, dtype=torch.float32, qk_scale: float = 6.0,
                   resize: bool = False) -> Path:
    """A random Qwen2-VL / Qwen2.5-VL of `cfg` (HF init under `seed`; text embeddings N(0, 1),
    lm_head N(0, 0.3), q/k projections x `qk_scale` for sharper attention, the merger's output
    layer x 20) with an image processor fixed to image x image pixels (min_pixels = max_pixels);
    `resize`: it brings any image to that size (smart_resize), else it takes only that size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    arch = cfg.architectures[0]
    if arch == "Qwen2VLForConditionalGeneration":
        from transformers import Qwen2VLForConditionalGeneration as Model
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
    torch.manual_seed(seed)
    ip = Qwen2VLImageProcessorPil(do_resize=resize, patch_size=cfg.vision_config.patch_size, merge_size=2,
                                  temporal_patch_size=2, min_pixels=image * image, max_pixels=image * image)
    with _default_dtype(dtype):
        model = Model(cfg).eval()
    with torch.no_grad():  # comparable scale for text and image tokens, and peaked answers
        model.get_input_embeddings().weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 0.3)
        for layer in model.model.language_model.layers:  # sharper attention: positions matter
            layer.self_attn.q_proj.weight.mul_(qk_scale)
            layer.self_attn.k_proj.weight.mul_(qk_scale)
        for m in (model.model.visual.merger.mlp[-1],) if hasattr(model.model.visual.merger, "mlp") else ():
            m.weight.mul_(20.0)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=SHARD)
    del model
    tok.save_pretrained(out)
    ip.save_pretrained(out)
    proc = "Qwen2VLProcessor" if arch == "Qwen2VLForConditionalGeneration" else "Qwen2_5_VLProcessor"
    (out / "processor_config.json").write_text(json.dumps({"processor_class": proc}, indent=2) + "\n")
    return out
