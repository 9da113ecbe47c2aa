"""LLaVA-NeXT (LLaVA-1.6) family: CLIP vision tower over any-resolution crops -> 2-layer projector
-> spatial unpad + one `image_newline` embedding per feature row -> Llama decoder, 1-D RoPE.

    image HxW -> processor -> pixel_values [1, 1+gh*gw, 3, c, c]   (c = vision image_size, the crop)
        crop 0: the whole image resized to c x c (the "base" crop)
        crops 1..: the image resized + padded to the best grid pinpoint (H', W'), cut into gh x gw
                   crops of c x c (gh = H'/c, gw = W'/c), row-major
    -> vision_tower -> hidden_states[feature_layer][:, 1:] (drop CLS) -> projector -> [n_crops, (c/p)^2, D]
    -> pack (HF's pack_image_features): base crop's (c/p)^2 features, then the grid crops' features
       stitched into one (H'/p) x (W'/p) map, unpadded back to the image's aspect ratio, each row
       followed by `image_newline` -> [N, D]
    ids with N <image> tokens (one contiguous run) -> embed -> scatter features -> Llama decoder

One declared image size per build: the image processor's `image_grid_pinpoints` must hold exactly
one resolution [H, W] (multiples of the crop size c, and listed in config.json's
image_grid_pinpoints), and images must be exactly H x W. The best resolution is then [H, W] itself
(no resize, no padding, unpad is the identity), so the crops, the number of visual tokens and the
packing are constants of the graph:

    N = (c/p)^2 + (H/p) * (W/p + 1)        (base crop + grid features + one newline per row)

which is what the processor's `_get_number_of_features` gives for that size (minus the CLS).
"""

from __future__ import annotations

import numpy as np
import torch

from quota_export import UserError
from quota_export.models import register
from quota_export.models.base import Prompt, encode_chat
from quota_export.models.llava import LlavaAdapter


@register("LlavaNextForConditionalGeneration")
class LlavaNextAdapter(LlavaAdapter):
    label = "LLaVA-NeXT"
    resizes_images = False  # one graph set per declared grid size (export.image_sizes)

    @classmethod
    def hf_classes(cls):
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        return LlavaNextConfig, LlavaNextForConditionalGeneration

    def check(self) -> None:
        """What this adapter does not lower, as one line each."""
        c = self.model.config
        cfg = self.path / "config.json"
        if c.vision_feature_select_strategy != "default":
            raise UserError(f"{cfg}: vision_feature_select_strategy {c.vision_feature_select_strategy!r} is not "
                            f"supported (LLaVA-NeXT packs crops without the CLS token: 'default' only)")
        if float(getattr(self.lm.rotary_emb, "attention_scaling", 1.0)) != 1.0:
            raise UserError(f"{cfg}: RoPE attention scaling is not supported")
        self.image_size()  # the declared size must be readable

    # --- image geometry (one declared size)
    def _ip(self):
        return self.processor.image_processor

    def crop(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def image_size(self) -> tuple[int, int]:
        ip, c = self._ip(), self.crop()
        pre = self.path / "preprocessor_config.json"
        pins = [list(map(int, p)) for p in (getattr(ip, "image_grid_pinpoints", None) or [])]
        model_pins = [list(map(int, p)) for p in (self.model.config.image_grid_pinpoints or [])]
        crop = getattr(ip, "crop_size", None)
        crop = crop if isinstance(crop, dict) else dict(getattr(crop, "__dict__", {}) or {})
        ch, cw = crop.get("height"), crop.get("width")
        if (ch, cw) != (c, c):
            raise UserError(f"{pre}: crop_size {ch}x{cw} must equal the vision tower's image_size {c}x{c}")
        if len(pins) != 1 or pins[0][0] % c or pins[0][1] % c or pins[0] not in model_pins:
            raise UserError(
                f"{pre}: the build needs one declared image size: set image_grid_pinpoints to exactly one "
                f"[H, W] with H and W multiples of the crop size {c}, also listed in config.json's "
                f"image_grid_pinpoints {model_pins} (got {pins})"
            )
        return (pins[0][0], pins[0][1])

    def with_image_size(self, h: int, w: int) -> "LlavaNextAdapter":
        import copy

        c = self.crop()
        model_pins = [list(map(int, p)) for p in (self.model.config.image_grid_pinpoints or [])]
        if h % c or w % c or [h, w] not in model_pins:
            raise UserError(
                f"export.image_sizes: [{h}, {w}] must be multiples of the crop size {c} and listed in "
                f"config.json's image_grid_pinpoints {model_pins}"
            )
        proc = copy.deepcopy(self.processor)
        proc.image_processor.image_grid_pinpoints = [[h, w]]
        return self._resized(proc)

    def image_sizes(self) -> list[list[int]]:
        """The constant `image_sizes` (H, W) HF's get_image_features takes, for the declared size."""
        return [list(self.image_size())]

    def n_crops(self) -> int:
        h, w = self.image_size()
        return 1 + (h // self.crop()) * (w // self.crop())

    def n_visual(self) -> int:
        h, w = self.image_size()
        p = self.model.config.vision_config.patch_size
        return (self.crop() // p) ** 2 + (h // p) * (w // p + 1)

    def pixel_shape(self) -> tuple[int, ...]:
        vc = self.model.config.vision_config
        return (1, self.n_crops(), vc.num_channels, self.crop(), self.crop())

    # --- prompts and features
    def prompt(self, image: np.ndarray, question: str) -> Prompt:
        enc = encode_chat(self.processor, image, question, self.image_size())
        ids = enc["input_ids"]
        pix = torch.as_tensor(enc["pixel_values"]).float()
        if tuple(pix.shape) != self.pixel_shape():
            raise UserError(f"processor made pixel_values {list(pix.shape)}, the declared size needs {list(self.pixel_shape())}")
        sizes = torch.as_tensor(enc["image_sizes"]).long()
        pos = (ids[0] == self.image_token_id()).nonzero().flatten()
        n = self.n_visual()
        if len(pos) != n or int(pos[-1] - pos[0]) != n - 1:
            raise UserError(f"prompt has {len(pos)} image tokens, expected one contiguous run of {n}")
        return Prompt(ids, pix, int(pos[0]), n, extra={"image_sizes": sizes})

    @torch.no_grad()
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_sizes=self.image_sizes())
        f = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(f, (list, tuple)):
            f = torch.stack(list(f), 0)
        return f.float()

    def vision_module(self) -> torch.nn.Module:
        """pixel_values [1, n_crops, 3, c, c] -> packed features [1, N, D]; the declared size a constant.

        The same computation as HF's get_image_features + pack_image_features, written with the
        grid as Python ints: HF's `unpad_image` rounds traced tensor shapes (it fails under
        torch.onnx.export tracing). The image being exactly the declared pinpoint, unpad is the
        identity and is left out. Checked against the HF path in the tests."""
        adapter = self
        cfg = self.model.config
        g = self.crop() // cfg.vision_config.patch_size  # features per crop side
        h, w = self.image_size()
        gh, gw = h // self.crop(), w // self.crop()
        rows, cols = gh * g, gw * g
        layer = cfg.vision_feature_layer

        class Vision(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.tower = adapter.model.model.vision_tower
                self.projector = adapter.model.model.multi_modal_projector
                self.newline = adapter.model.model.image_newline

            def forward(self, pixel_values):
                hs = self.tower(pixel_values[0], output_hidden_states=True, return_dict=True).hidden_states
                x = hs[layer] if isinstance(layer, int) else torch.cat([hs[i] for i in layer], dim=-1)
                f = self.projector(x[:, 1:])  # 'default': drop CLS -> [n_crops, g*g, D]
                d = f.shape[-1]
                base = f[0]
                m = f[1:].reshape(gh, gw, g, g, d).permute(4, 0, 2, 1, 3).reshape(d, rows, cols)
                nl = self.newline[:, None, None].expand(d, rows, 1).to(m.dtype)
                m = torch.cat((m, nl), dim=-1).flatten(1, 2).transpose(0, 1)
                return torch.cat((base, m), dim=0)[None].float()

        return Vision()
