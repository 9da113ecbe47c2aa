"""Qwen2-VL family (and Qwen2.5-VL's decoder/positions): ViT over flattened patches -> 2x2 patch
merger -> Qwen2 decoder (q/k/v biases) with M-RoPE.

    image HxW -> processor -> pixel_values [gh*gw, C*tp*p*p] (patches in 2x2-merge order),
                              image_grid_thw [[1, gh, gw]]       gh = H/p, gw = W/p
              -> model.model.visual(pixel_values, grid) -> merged features [N, D], N = gh*gw / m^2
    ids: ... <|vision_start|> <|image_pad|> x N <|vision_end|> ... -> embed -> scatter features
    positions (M-RoPE, [3,1,T]): text before the image 0..s-1 in all three planes; visual token j at
      (s, s + row_j, s + col_j) (temporal, height, width; HF's get_rope_index); text after the image
      continues at s + max(gh, gw)/m; the first decode position is max + 1, the same in every plane.
    rotary: frequency f reads plane (section of f) % 3, sections = rope_parameters["mrope_section"].

One declared image size per build: the image processor must fix it (size.shortest_edge ==
size.longest_edge == H*W, a square side that is a multiple of patch_size * merge_size), so the grid,
the number of visual tokens and the visual block's positions are constants of the graphs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from quota_export import UserError
from quota_export.models import register
from quota_export.models.base import Adapter, DecoderSpec, Prompt, encode_chat
from quota_export.models.loading import PROCESSOR_FALLBACKS


class QwenImageTextProcessor:
    """The image + text half of `Qwen2VLProcessor`, built from the folder's tokenizer and image
    processor (transformers constructs Qwen2VLProcessor only with torchvision installed, for its
    video processor). Same outputs: the image token expanded to grid.prod() / merge^2 copies,
    input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw."""

    processor_class = "Qwen2VLProcessor"

    def __init__(self, tokenizer, image_processor, processor_class: str = "Qwen2VLProcessor"):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.processor_class = processor_class
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, path: Path) -> "QwenImageTextProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        from quota_export.models.loading import processor_class

        return cls(AutoTokenizer.from_pretrained(str(path)), AutoImageProcessor.from_pretrained(str(path)),
                   processor_class(path) or "Qwen2VLProcessor")

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, **kw):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)

    def __call__(self, images=None, text=None, return_tensors=None):
        out = {}
        if images is not None:
            img = self.image_processor(images=images, return_tensors=return_tensors)
            out.update(pixel_values=img["pixel_values"], image_grid_thw=img["image_grid_thw"])
            merge = self.image_processor.merge_size
            counts = [int(np.prod(np.asarray(g))) // merge**2 for g in img["image_grid_thw"]]
            parts = text.split(self.image_token)
            if len(parts) - 1 != len(counts):
                raise ValueError(f"text has {len(parts) - 1} image tokens for {len(counts)} images")
            text = parts[0] + "".join(self.image_token * c + p for c, p in zip(counts, parts[1:]))
        enc = self.tokenizer(text, return_tensors=return_tensors)
        ids = enc["input_ids"]
        out.update(input_ids=ids, attention_mask=enc["attention_mask"], mm_token_type_ids=(ids == self.image_token_id) * 1)
        return out

    def save_pretrained(self, out) -> None:
        import json

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        (out / "processor_config.json").write_text(json.dumps({"processor_class": self.processor_class}, indent=2) + "\n")


PROCESSOR_FALLBACKS["Qwen2VLProcessor"] = QwenImageTextProcessor.from_pretrained
PROCESSOR_FALLBACKS["Qwen2_5_VLProcessor"] = QwenImageTextProcessor.from_pretrained


def mrope_sections_to_planes(sections: list[int], half_dim: int) -> list[int]:
    """mrope_section [a, b, c, ...] -> plane of each of the head_dim/2 frequencies: section i reads
    plane i % 3 (HF's `recomposition_frequencies`)."""
    if sum(sections) != half_dim:
        raise UserError(f"config.json: rope_parameters.mrope_section {sections} must sum to head_dim/2 = {half_dim}")
    return [i % 3 for i, s in enumerate(sections) for _ in range(s)]


@register("Qwen2VLForConditionalGeneration")
class Qwen2VLAdapter(Adapter):
    label = "Qwen2-VL"

    @classmethod
    def hf_classes(cls):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        return Qwen2VLConfig, Qwen2VLForConditionalGeneration


    def check(self) -> None:
        """What this adapter does not lower yet, as one line each."""
        c = self.model.config.text_config
        cfg = self.path / "config.json"
        if getattr(c, "use_sliding_window", False):
            raise UserError(f"{cfg}: use_sliding_window is not supported (full attention only)")
        rp = c.rope_parameters or {}
        if rp.get("rope_type", "default") not in ("default", "mrope"):
            raise UserError(f"{cfg}: rope_type {rp.get('rope_type')!r} is not supported (default M-RoPE only)")
        if float(getattr(self.lm.rotary_emb, "attention_scaling", 1.0)) != 1.0:
            raise UserError(f"{cfg}: RoPE attention scaling is not supported")
        self.image_size()  # the declared size must be readable

    def decoder_spec(self) -> DecoderSpec:
        c = self.model.config.text_config
        eos = c.eos_token_id if c.eos_token_id is not None else self.model.config.eos_token_id
        return DecoderSpec(
            num_layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads,
            head_dim=c.hidden_size // c.num_attention_heads,  # as Qwen2VLAttention computes it
            intermediate=c.intermediate_size,
            vocab=c.vocab_size,
            rms_eps=c.rms_norm_eps,
            rope_theta=c.rope_parameters["rope_theta"],
            eos_token_id=eos if isinstance(eos, int) else eos[0],
            module_prefix="model.language_model",
        )

    def default_ignore(self) -> list[str]:
        return ["lm_head", r"^model\.visual\."]

    def rope_planes(self) -> list[int]:
        c = self.model.config.text_config
        sections = list(c.rope_parameters.get("mrope_section") or self.lm.rotary_emb.mrope_section)
        return mrope_sections_to_planes(sections, self.decoder_spec().head_dim // 2)

    # --- image geometry (one declared size)
    def _ip(self):
        return self.processor.image_processor

    def factor(self) -> int:
        vc = self.model.config.vision_config
        return vc.patch_size * vc.spatial_merge_size

    def with_image_size(self, h: int, w: int) -> "Qwen2VLAdapter":
        import copy

        f = self.factor()
        if h % f or w % f:
            raise UserError(
                f"export.image_sizes: [{h}, {w}]: H and W must be multiples of patch_size * merge_size = {f}"
            )
        proc = copy.deepcopy(self.processor)
        ip = proc.image_processor
        # min_pixels = max_pixels = H*W: the processor's smart_resize leaves an H x W image as it is
        ip.size = {"shortest_edge": h * w, "longest_edge": h * w}
        for attr in ("min_pixels", "max_pixels"):
            if hasattr(ip, attr):
                setattr(ip, attr, h * w)
        new = self._resized(proc)
        new._declared = (h, w)
        return new

    def image_size(self) -> tuple[int, int]:
        if getattr(self, "_declared", None):
            return self._declared
        ip = self._ip()
        size = ip.size if isinstance(ip.size, dict) else dict(ip.size.__dict__)
        lo, hi = size.get("shortest_edge"), size.get("longest_edge")
        side = math.isqrt(int(hi)) if hi else 0
        if lo != hi or side * side != hi or side % self.factor():
            raise UserError(
                f"{self.path / 'preprocessor_config.json'}: the build needs one declared image size: set "
                f"size.shortest_edge = size.longest_edge = S*S (min_pixels = max_pixels) with S a multiple of "
                f"patch_size * merge_size = {self.factor()} (got {lo} / {hi})"
            )
        return (side, side)

    def grid_thw(self) -> torch.Tensor:
        h, w = self.image_size()
        p = self.model.config.vision_config.patch_size
        return torch.tensor([[1, h // p, w // p]], dtype=torch.long)

    def n_visual(self) -> int:
        h, w = self.image_size()
        f = self.factor()
        return (h // f) * (w // f)

    def pixel_shape(self) -> tuple[int, ...]:
        vc = self.model.config.vision_config
        _, gh, gw = self.grid_thw()[0].tolist()
        return (gh * gw, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2)

    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    # --- prompts and features
    def prompt(self, image: np.ndarray, question: str) -> Prompt:
        enc = encode_chat(self.processor, image, question, self.image_size())
        ids = enc["input_ids"]
        grid = torch.as_tensor(enc["image_grid_thw"])
        if not torch.equal(grid, self.grid_thw()):
            raise UserError(f"processor made an image grid {grid.tolist()}, the declared size needs {self.grid_thw().tolist()}")
        pos = (ids[0] == self.image_token_id()).nonzero().flatten()
        n = self.n_visual()
        if len(pos) != n or int(pos[-1] - pos[0]) != n - 1:
            raise UserError(f"prompt has {len(pos)} image tokens, expected one contiguous run of {n}")
        mm = enc.get("mm_token_type_ids")
        mm = (ids == self.image_token_id()).int() if mm is None else torch.as_tensor(mm)
        with torch.no_grad():
            position_ids, _ = self.model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid)
        return Prompt(ids, torch.as_tensor(enc["pixel_values"]).float(), int(pos[0]), n,
                      position_ids=position_ids.long(), next_position=int(position_ids.max()) + 1,
                      extra={"image_grid_thw": grid})

    @torch.no_grad()
    def vision_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        grid = self.grid_thw() if image_grid_thw is None else image_grid_thw
        out = self.model.model.get_image_features(pixel_values, grid)
        f = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(f, (list, tuple)):
            f = torch.stack(list(f), 0)
        return f.float()

    def vision_module(self) -> torch.nn.Module:
        """flattened patches [gh*gw, C*tp*p*p] -> merged features [1, N, D], the grid a constant."""
        adapter = self

        class Vision(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.visual = adapter.model.model.visual

            def forward(self, pixel_values):
                out = self.visual(pixel_values, grid_thw=adapter.grid_thw())
                return out.pooler_output[None].float()

        return Vision()


@register("Qwen2_5_VLForConditionalGeneration")
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: the same decoder, positions and merged features; its vision tower adds window
    attention (exported as traced, with the window index a constant of the declared grid)."""

    label = "Qwen2.5-VL"

    @classmethod
    def hf_classes(cls):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
