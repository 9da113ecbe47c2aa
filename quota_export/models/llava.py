"""LLaVA-1.5 family: CLIP vision tower -> 2-layer projector -> Llama decoder, 1-D RoPE.

    pixels [1,3,H,W] -> vision_tower -> hidden_states[feature_layer][:, 1:] (drop CLS)
                     -> multi_modal_projector -> [1, N, D]
    ids with N <image> tokens -> embed -> masked_scatter(features) -> decoder
Visual span: the contiguous run of image_token_index in input_ids (one image per prompt).
"""

from __future__ import annotations

import numpy as np
import torch

from quota_export import UserError
from quota_export.models import register
from quota_export.models.base import Adapter, DecoderSpec, Prompt, encode_chat


@register("LlavaForConditionalGeneration")
class LlavaAdapter(Adapter):
    label = "LLaVA"
    resizes_images = True  # one fixed input size: the processor resizes any image to it

    @classmethod
    def hf_classes(cls):
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        return LlavaConfig, LlavaForConditionalGeneration

    def decoder_spec(self) -> DecoderSpec:
        c = self.model.config.text_config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return DecoderSpec(
            num_layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads,
            head_dim=hd,
            intermediate=c.intermediate_size,
            vocab=c.vocab_size,
            rms_eps=c.rms_norm_eps,
            rope_theta=getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"],
            eos_token_id=c.eos_token_id if isinstance(c.eos_token_id, int) else c.eos_token_id[0],
            module_prefix="model.language_model",
        )

    def image_size(self) -> tuple[int, int]:
        s = self.model.config.vision_config.image_size
        return (s, s)

    def image_token_id(self) -> int:
        return int(self.model.config.image_token_index)

    def n_visual(self) -> int:
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n if self.model.config.vision_feature_select_strategy == "default" else n + 1

    def prompt(self, image: np.ndarray, question: str) -> Prompt:
        enc = encode_chat(self.processor, image, question, self.image_size(), resize=self.resizes_images)
        ids = enc["input_ids"]
        img_id = self.model.config.image_token_index
        pos = (ids[0] == img_id).nonzero().flatten()
        n = self.n_visual()
        if len(pos) != n or int(pos[-1] - pos[0]) != n - 1:
            raise UserError(f"prompt has {len(pos)} image tokens, expected one contiguous run of {n}")
        return Prompt(ids, enc["pixel_values"].float(), int(pos[0]), n)

    @torch.no_grad()
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=pixel_values)
        f = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(f, (list, tuple)):
            f = torch.stack(list(f), 0)
        return f.float()

    def vision_module(self) -> torch.nn.Module:
        """pixels -> projected features, as one module (for the vision graph export)."""
        adapter = self

        class Vision(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = adapter.model

            def forward(self, pixel_values):
                return adapter.vision_features(pixel_values)

        return Vision()

