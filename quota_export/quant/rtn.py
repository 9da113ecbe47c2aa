"""Round-to-nearest weight quantization: min/max scales per channel or group, ONNX-exact rounding."""

from __future__ import annotations

import torch

from quota_export.quant.quantizers import QWeight, quantize_weight
from quota_export.recipe import WeightQuant


def rtn(w: torch.Tensor, cfg: WeightQuant, act_bits: int = 16) -> QWeight:
    """Quantize a linear weight w [out, in] as `cfg` asks (bits 4 or 8; 16 means "don't call me").

    `act_bits` is the width of the activations it will multiply (exact accumulation, see recipe)."""
    if cfg.bits == 16:
        raise ValueError("bits 16 means the weight is not quantized")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    k = w.shape[1]
    return quantize_weight(w, cfg.bits, cfg.symmetric, cfg.group_size_for(k), scale_bits=cfg.scale_bits_for(k, act_bits))
