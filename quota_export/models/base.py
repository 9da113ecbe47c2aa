"""The adapter interface and the family-neutral decoder description."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class DecoderSpec:
    """What the reference and the lowering need to know of a Llama-style decoder."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    rope_theta: float
    eos_token_id: int
    module_prefix: str  # e.g. "model.language_model" (for names like <prefix>.layers.3.self_attn.q_proj)


@dataclass
class Prompt:
    """One prompt ready for the model: ids, pixels, and where the visual tokens sit.

    `position_ids` is None for 1-D RoPE (positions 0..T-1, the next one T); for M-RoPE it holds the
    [P,1,T] position planes and `next_position` the first decode position (max position + 1; a
    decode step then has that same value in every plane)."""

    input_ids: torch.Tensor  # [1, T] int64
    pixel_values: torch.Tensor  # [1, 3, H, W] float32 (LLaVA); the family's own layout otherwise
    visual_start: int
    n_visual: int
    position_ids: torch.Tensor | None = None  # [P, 1, T] int64 for M-RoPE
    next_position: int | None = None
    extra: dict = field(default_factory=dict)  # family-specific inputs (e.g. image_grid_thw)

    def positions(self) -> torch.Tensor:
        """[1,T] (1-D) or [P,1,T] (M-RoPE) position ids of the prompt."""
        if self.position_ids is not None:
            return self.position_ids
        return torch.arange(self.input_ids.shape[1])[None]

    def first_decode_position(self) -> int:
        return self.input_ids.shape[1] if self.next_position is None else int(self.next_position)


def encode_chat(processor, image: np.ndarray, question: str, size: tuple[int, int], who: str = "the model takes",
                return_tensors: str = "pt", resize: bool = False):
    """Check the image (HxWx3), put it and the question in the processor's chat template, and run
    the processor. Shared by every adapter and by the ONNX Runtime runner.

    `resize` (fixed-resolution families, `Adapter.resizes_images`): an image of any size is brought
    to `size` as the family's HF image processor does: by the processor itself when it resizes
    (e.g. LLaVA-1.5's CLIP processor: shortest edge, then center crop), else (do_resize false, as
    in the shipped shapes model) by that processor's own resize to `size` (its resample filter).
    Without it the image must be exactly `size` (one graph set per declared image size)."""
    from quota_export import UserError

    h, w = size
    if image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"image must be HxWx3 RGB, got shape {tuple(image.shape)}")
    kw = {}
    if image.shape[:2] != (h, w):
        if not resize:
            raise UserError(f"image is {image.shape[1]}x{image.shape[0]}, {who} {w}x{h} (one graph set per "
                            "declared image size: list the sizes to serve in export.image_sizes)")
        if not getattr(processor.image_processor, "do_resize", False):
            kw = {"do_resize": True, "size": {"height": h, "width": w}}
    from PIL import Image

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    enc = processor(images=Image.fromarray(image), text=text, return_tensors=return_tensors, **kw)
    got = tuple(enc["pixel_values"].shape[-2:])
    if resize and got != (h, w):
        raise UserError(f"image is {image.shape[1]}x{image.shape[0]}: the image processor makes {got[1]}x{got[0]} "
                        f"pixels of it, {who} {w}x{h} (check preprocessor_config.json)")
    return enc


class Adapter:
    architecture: str = ""
    # fixed-resolution families: images of any size are resized to image_size() the way the
    # family's HF image processor does (encode_chat); dynamic-resolution families build one graph
    # set per declared size and take only those sizes
    resizes_images: bool = False

    def __init__(self, model, processor, path: Path):
        self.model = model.eval()
        self.processor = processor
        self.path = Path(path)

    label: str = ""  # family name in messages

    @classmethod
    def hf_classes(cls):
        """(HF config class, HF model class) of the family."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path: Path) -> "Adapter":
        """Checkpoint + processor of a local HF folder, every problem one UserError line; then
        `check` rejects what the adapter does not lower."""
        from quota_export import UserError, one_line
        from quota_export.models.loading import load_checkpoint, load_processor

        config_cls, model_cls = cls.hf_classes()
        model = load_checkpoint(path, config_cls, model_cls, cls.label)
        try:
            processor = load_processor(path)
        except (OSError, ValueError, TypeError, KeyError, ImportError, AttributeError) as e:
            raise UserError(f"{path}: cannot load processor / tokenizer ({one_line(e)})") from None
        ad = cls(model, processor, path)
        ad.vision_to_fp32()
        ad.check()
        return ad

    def vision_to_fp32(self) -> None:
        """Upcast the vision side (everything of model.model but the decoder: vision tower,
        projector, e.g. LLaVA-NeXT's image_newline) to float32 in place; the decoder, its embeddings
        and lm_head keep the checkpoint's dtype (bf16 / fp16 stay half the memory). The reference
        reads decoder weights with .float() and the vision graph is traced from these modules, so a
        half-precision checkpoint builds and runs exactly like its fp32 upcast (the vision graph
        takes float32 pixels on ONNX Runtime CPU). A no-op on a float32 checkpoint. The half-precision
        tensors' pages of the memory-mapped checkpoint are handed back (weightcache.page_out)."""
        from quota_export.weightcache import page_out

        inner = self.model.model
        tensors = [t for child in inner.children() if child is not self.lm
                   for t in (*child.parameters(), *child.buffers())] + list(inner.parameters(recurse=False))
        for t in tensors:
            if t.is_floating_point() and t.dtype != torch.float32:
                old = t.data
                t.data = old.float()
                page_out(old)

    def check(self) -> None:
        """What this adapter does not lower, as one UserError line each (default: nothing)."""

    # --- what every family provides
    def decoder_spec(self) -> DecoderSpec:
        raise NotImplementedError

    # HF's *ForConditionalGeneration VLMs keep the decoder at model.model.language_model and the
    # head at model.lm_head; a family that differs overrides these.
    @property
    def lm(self):
        return self.model.model.language_model

    def layers(self):
        return list(self.lm.layers)

    def final_norm(self):
        return self.lm.norm

    def lm_head(self):
        return self.model.lm_head

    def embed_tokens(self):
        return self.lm.embed_tokens

    def inv_freq(self) -> torch.Tensor:
        return self.lm.rotary_emb.inv_freq.float()

    def default_ignore(self) -> list[str]:
        """Regexes of modules calibration leaves unquantized (vision side, projector, lm_head);
        each must match a module of this family (recipe.check_against enforces it)."""
        from quota_export.recipe import DEFAULT_IGNORE

        return list(DEFAULT_IGNORE)

    def rope_planes(self) -> list[int] | None:
        """None for 1-D RoPE (position_ids [1,T]); for M-RoPE, the position plane each of the
        head_dim/2 frequencies reads (position_ids [P,1,T])."""
        return None

    def image_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def with_image_size(self, h: int, w: int) -> "Adapter":
        """This model with H x W declared as its image size (same weights, a processor fixed to
        that size): `export.image_sizes` builds one graph set per size. Families with one fixed
        input size accept only that size; dynamic-resolution families override this."""
        from quota_export import UserError

        own = tuple(self.image_size())
        if (h, w) != own:
            raise UserError(
                f"export.image_sizes: {self.architecture} takes one image size, {own[1]}x{own[0]} "
                f"(got {w}x{h} as [H, W] = [{h}, {w}])"
            )
        return self

    def _resized(self, processor) -> "Adapter":
        """A shallow copy sharing the model, with another processor."""
        import copy

        new = copy.copy(self)
        new.processor = processor
        return new

    def pixel_shape(self) -> tuple[int, ...]:
        """Shape of `Prompt.pixel_values` (the vision graph's input) for the declared image size."""
        h, w = self.image_size()
        return (1, 3, h, w)

    def image_token_id(self) -> int:
        raise NotImplementedError

    def n_visual(self) -> int:
        raise NotImplementedError

    def prompt(self, image: np.ndarray, question: str) -> Prompt:
        raise NotImplementedError

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def vision_module(self) -> torch.nn.Module:
        """pixel_values (shape `pixel_shape()`) -> features [1, N, D], for the vision graph export."""
        raise NotImplementedError

    def module_names(self) -> list[str]:
        return [n for n, _ in self.model.named_modules()]
