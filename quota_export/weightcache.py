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

    PackedCodes     the quantized linears' 4-bit codes, two per byte (unpacked when read)
    page_out(t)     the checkpoint's tensors are memory-mapped from its safetensors files: once a
                    quantized linear's codes exist, its pages are handed back to the kernel
                    (madvise MADV_PAGEOUT, Linux; a hint that never loses data: a page read
                    again comes back from the file, and anonymous memory is left alone without swap)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import sys
from collections.abc import Callable, MutableMapping

import torch

CACHE_BYTES = 2 << 30  # fp32 weights kept made per Deployed (its views share them)


MADV_PAGEOUT = 21  # linux/mman.h (Linux >= 5.4)
_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc


def page_out(t: torch.Tensor) -> bool:
    """Ask the kernel to reclaim the whole pages of `t`'s memory now (see the module doc); False
    where it cannot (not Linux, an older kernel)."""
    if not sys.platform.startswith("linux") or t.numel() == 0:
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + nbytes(t)) // page * page
    return end <= start or _c().madvise(start, end - start, MADV_PAGEOUT) == 0


def trim() -> None:
    """Give the C heap's free memory back to the system (glibc malloc_trim; elsewhere nothing):
    after a phase that freed gigabytes (a graph written, sessions released), so that the next
    phase's peak is its own."""
    if sys.platform.startswith("linux") and hasattr(_c(), "malloc_trim"):
        _c().malloc_trim(0)


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

    def in_features(self, lin: str) -> int:
        """The linear's input width, without making its fp32 weight."""
        w = self.set.get(lin)
        return int((w if w is not None else self.weight_of(self.names[lin])).shape[1])

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


class PackedCodes(MutableMapping):
    """{module name: QWeight} holding 4-bit codes two per byte (half the bytes of int8 codes:
    LLaVA-1.5-7B 3.3 GB instead of 6.5 GB); a QWeight read from it has its usual int8/uint8 codes,
    unpacked for the caller. Other bit widths are kept as given."""

    def __init__(self, items=()):
        self._d: dict = {}
        for k, v in dict(items).items():
            self[k] = v

    def __setitem__(self, name: str, qw) -> None:
        if qw.bits == 4 and qw.q.shape[-1] % 2 == 0:
            u = (qw.q.to(torch.int16) & 0xF).to(torch.uint8)
            qw = (dataclasses.replace(qw, q=u[:, 0::2] | (u[:, 1::2] << 4)), qw.q.dtype)
        self._d[name] = qw

    def __getitem__(self, name: str):
        v = self._d[name]
        if not isinstance(v, tuple):
            return v
        qw, dtype = v
        lo, hi = (qw.q & 0xF), (qw.q >> 4)
        q = torch.stack([lo, hi], dim=-1).view(qw.q.shape[0], -1).to(torch.int16)
        if dtype == torch.int8:
            q = q - ((q & 0x8) << 1)  # sign-extend the nibble
        return dataclasses.replace(qw, q=q.to(dtype))

    def __delitem__(self, name: str) -> None:
        del self._d[name]

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)
