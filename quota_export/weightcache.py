"""Deployed weights in fp32 on demand, so the reference holds the checkpoint once (issue #21).

A real-size decoder's fp32 weights are twice a bf16 checkpoint (LLaVA-1.5-7B: 26 GB next to
14 GB). `reference.Deployed` therefore keeps only what the recipe stores (the checkpoint's
tensors, in their dtype, and the integer codes of the quantized linears) and makes a linear's
fp32 weight (the dequantized codes, or the upcast checkpoint weight) when a layer asks for it.

    LayerWeights    dep.W[layer][lin] -> fp32 [out, in], made on first use
    PinnedCache     keeps made tensors while they fit a byte budget (first come, kept for good):
                    a small model keeps everything (made once, as before); a large one keeps its
                    first layers and remakes the rest per pass, with bounded memory

Remaking is exact (the same ops on the same tensors), so the numbers do not depend on the budget.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

import torch

CACHE_BYTES = 2 << 30  # fp32 weights kept made per Deployed (its views share them)


def nbytes(t) -> int:
    return t.numel() * t.element_size()


class PinnedCache:
    """key -> tensor made by `make()`, kept while the kept bytes stay within `budget`."""

    def __init__(self, budget: int | None = None):
        self.budget = CACHE_BYTES if budget is None else budget
        self.used = 0
        self.kept: dict = {}

    def get(self, key, make: Callable[[], torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
        """`base`: the tensor `make` reads; a result sharing its memory (an fp32 checkpoint's
        weight, `.float()` a no-op) costs nothing to keep."""
        t = self.kept.get(key)
        if t is None:
            t = make()
            cost = 0 if base is not None and t.data_ptr() == base.data_ptr() else nbytes(t)
            if self.used + cost <= self.budget:
                self.kept[key] = t
                self.used += cost
        return t


class LayerWeights(MutableMapping):
    """One decoder layer's linears as fp32 [out, in] (`Deployed.W[layer]`): the dequantized codes
    of a quantized linear, else `float_weight(name)`; an assigned weight (GPTQ's) replaces it."""

    def __init__(self, names: dict[str, str], qweights, float_weight: Callable[[str], torch.Tensor],
                 weight_of: Callable[[str], torch.Tensor], cache: PinnedCache):
        self.names = names  # lin -> module name
        self.qweights = qweights
        self.float_weight = float_weight
        self.weight_of = weight_of  # the checkpoint's tensor (what an upcast reads)
        self.cache = cache
        self.set: dict[str, torch.Tensor] = {}

    def __getitem__(self, lin: str) -> torch.Tensor:
        if lin in self.set:
            return self.set[lin]
        n = self.names[lin]
        if n in self.qweights:
            return self.cache.get(("dequant", n), lambda: self.qweights[n].dequant())
        return self.cache.get(("float", n), lambda: self.float_weight(n), self.weight_of(n))

    def __setitem__(self, lin: str, w: torch.Tensor) -> None:
        if lin not in self.names:
            raise KeyError(lin)
        self.set[lin] = w

    def __delitem__(self, lin: str) -> None:
        raise TypeError("a layer's linears cannot be removed")

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
