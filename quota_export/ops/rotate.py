"""The online Hadamard rotation y = x diag(signs) H (quant.activations.rotation: hadamard).

H = kron(H_{2^k}, P_m) / sqrt(n) for n = 2^k m (quant/hadamard.py `hadamard_matrix`: Sylvester
H_{2^k}, P_m a ±1 Paley factor, m = 1 for powers of two). With x viewed as X [.., 2^k, m]
(index a m + b), x H = H_{2^k} X P_m / sqrt(n): a small ±1 matmul on the last axis, then the fast
Walsh–Hadamard transform over the 2^k axis (one add/sub butterfly per bit), then one scale.

    torch: rotate(x, rot, hp)          ONNX: rotate_onnx(e, x, rot, scope)      x [B, T, n] fp32
    (rot.inverted(): x -> x H^T diag(signs), P_m^T and the signs last: the pruning signals' view)

    x ─ Cast(hp) ─ Mul(signs) ─ Reshape [B,T,2^k,m] ─ MatMul(P_m) ─┐
        ┌───────────────────────────────────────────────────────────┘
        └─ k × { Reshape [B,T,2^j,2,2^(k-j-1),m] ─ Slice(0), Slice(1) ─ Add, Sub ─ Concat }
           ─ Reshape [B,T,n] ─ Mul(1/sqrt(n)) ─ Cast(f32)

Exactness. Both forms do the same IEEE operations in the same order (the signs, the butterflies
and the scale are elementwise), so they give the same bits in either precision; the one
reduction is the ±1 product with P_m (m terms, e.g. 12 for 192 = 2^4 12), exact in float64 for
fp32 inputs unless their magnitudes span more than ~2^25. It costs n (log2 n + m) operations per
token where a constant MatMul costs n^2 (docs/numerics.md, "Rotation").

Where it sits: on the decoder input (the residual-stream rotation Q = diag(signs) H, which QuaRot
fuses into the embeddings and the projector; here the embed and vision graphs stay the
checkpoint's) and before down_proj's activation quantizer (H of the intermediate size, no signs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from quota_export.ops.base import Emit


@dataclass(frozen=True)
class Rotation:
    """x -> x diag(signs) kron(H_{2^k}, P_m) / sqrt(n) over the last axis (n = 2^k m)."""

    n: int
    pm: np.ndarray  # float64 [m, m], entries ±1 ([[1]] when n is a power of two)
    signs: np.ndarray | None = None  # float64 [n] of ±1, or None
    inverse: bool = False  # x -> x H^T diag(signs): P_m^T, the signs last (the matrix's transpose)

    @classmethod
    def of(cls, n: int, signs: torch.Tensor | None = None) -> Rotation:
        """The rotation of size n (ValueError if n is not a Hadamard size, quant/hadamard.py)."""
        from quota_export.quant.hadamard import hadamard_factor

        f = hadamard_factor(n)
        if f is None:
            raise ValueError(f"{n} is not a Hadamard size (2^k * m with m = 1 or a Paley order)")
        return cls(n, f[1].numpy(), None if signs is None else signs.double().numpy())

    @property
    def m(self) -> int:
        return self.pm.shape[0]

    @property
    def k(self) -> int:
        return (self.n // self.m).bit_length() - 1

    def matrix(self) -> torch.Tensor:
        """The orthonormal [n, n] float64 matrix this applies (for the offline weight rotation)."""
        from quota_export.quant.hadamard import hadamard_matrix

        h = hadamard_matrix(self.n)
        h = h if self.signs is None else torch.from_numpy(self.signs)[:, None] * h
        return h.T if self.inverse else h

    def inverted(self) -> Rotation:
        """The inverse rotation (the transpose: x -> x H^T diag(signs))."""
        return dataclasses.replace(self, inverse=not self.inverse)


def rotate(x: torch.Tensor, rot: Rotation, hp: torch.dtype) -> torch.Tensor:
    """x [.., T, n] -> x diag(signs) H (computed in hp, rounded once to fp32)."""
    lead = x.shape[:-1]
    y = x.to(hp)
    signs = None if rot.signs is None else torch.from_numpy(rot.signs).to(hp)
    if signs is not None and not rot.inverse:
        y = y * signs
    y = y.reshape(*lead, 1 << rot.k, rot.m)
    if rot.m > 1:
        y = y @ torch.from_numpy(rot.pm.T.copy() if rot.inverse else rot.pm).to(hp)
    for j in range(rot.k):
        y = y.reshape(*lead, 1 << j, 2, 1 << (rot.k - j - 1), rot.m)
        a, b = y[..., 0:1, :, :], y[..., 1:2, :, :]
        y = torch.cat([a + b, a - b], dim=-3)
    y = y.reshape(*lead, rot.n) * torch.tensor(1.0 / math.sqrt(rot.n), dtype=hp)
    if signs is not None and rot.inverse:
        y = y * signs
    return y.float()


def rotate_onnx(e: Emit, x, rot: Rotation, scope: str):
    """The ONNX form of `rotate` for x [B, T, n] fp32 (the same ops, module doc)."""
    k, m = rot.k, rot.m
    shape = lambda *d: e.const([0, 0, *d], np.int64)  # noqa: E731  (0: keep B and T)
    with e.scope(scope):
        y = e.to_hp(x)
        if rot.signs is not None and not rot.inverse:
            y = e.op("Mul", [y, e.init("signs", e.hconst(rot.signs))], name="signs")
        y = e.op("Reshape", [y, shape(1 << k, m)])
        if m > 1:
            y = e.op("MatMul", [y, e.init("paley", e.hconst(rot.pm.T if rot.inverse else rot.pm))], name="paley")
        for j in range(k):
            with e.scope(f"butterfly_{j}"):
                y = e.op("Reshape", [y, shape(1 << j, 2, 1 << (k - j - 1), m)])
                a, b = e.slice(y, 0, 1, axis=3), e.slice(y, 1, 2, axis=3)
                y = e.op("Concat", [e.op("Add", [a, b]), e.op("Sub", [a, b])], axis=3)
        y = e.op("Reshape", [y, shape(rot.n)])
        y = e.op("Mul", [y, e.hc(1.0 / math.sqrt(rot.n))], name="scale")
        if rot.signs is not None and rot.inverse:
            y = e.op("Mul", [y, e.init("signs", e.hconst(rot.signs))], name="signs")
        return e.to_f(y)
