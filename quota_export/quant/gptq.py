"""GPTQ (Frantar et al., 2022) for one linear weight, with our ONNX-exact quantizer grid.

    calibration inputs x [..., in] --HessianAccumulator.add--> H = 2 X^T X / n   [in, in]
    w [out, in], H --gptq_quantize--> QWeight (codes, blocked scales [out, in/g])

The loop follows the reference implementation (IST-DASLab `gptq.py`, `fasterquant`):
dead columns (diag H == 0) are zeroed and get H_jj = 1; H += damp * mean(diag H) * I;
U = chol(H^-1) upper; columns are quantized left to right with lazy block updates of
`block_size`; the error of column j is spread over the remaining columns by U[j, j:] / U[j, j].

Scales, as in the reference:
- without act-order, a group's scales are computed (min/max, `weight_scales`) when the group's
  first column is reached, from `W` as last updated at a block boundary — a group starting in
  the middle of a block does not see the updates of that block's earlier columns (the reference
  reads `W`, not the block copy `W1`). With group_size a multiple of block_size this is the
  fully updated weight.
- with act-order (columns by descending diag H), groups are static (the reference's
  `static_groups=True`): every group's scales are computed up front from W (dead columns
  zeroed) in the original column order, so the result stays a plain blocked layout
  [out, in/g] with no g_idx.
Deviation from the reference: the grid is ours (signed symmetric [-2^(b-1), 2^(b-1)-1] or
asymmetric with a uint zero point, see quantizers.py), and channel scales are computed after
dead columns are zeroed.

`QWeight.dequant()` of the result equals, bit for bit, the weights GPTQ settled on.
"""

from __future__ import annotations

import torch

from quota_export.quant.quantizers import QWeight, dequantize, grid_exponent, quantize, weight_scales
from quota_export.recipe import WeightQuant


class HessianAccumulator:
    """Accumulates H = 2 X^T X / n over calibration inputs x [..., in] (float64 sums).

    The 1/n (n = rows seen) keeps H's scale independent of the sample count; GPTQ is invariant
    to a positive scale of H (damping is relative to mean(diag H)).
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self._xtx = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features).to(torch.float64)
        self._xtx.addmm_(x.T, x)
        self.n += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n as float64 [in, in]."""
        if self.n == 0:
            raise ValueError("no calibration inputs were added")
        return 2.0 * self._xtx / self.n

    def attach(self, module: torch.nn.Module):
        """Accumulate the module's input on every forward; returns the hook handle (call .remove())."""

        def hook(_mod, args):
            self.add(args[0])

        return module.register_forward_pre_hook(hook)


def _inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """U upper triangular with U^T U = H^-1 (the reference's chol(cholesky_inverse(chol(H))))."""
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"GPTQ: the damped Hessian is not positive definite; raise gptq.damp ({e})") from None


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    symmetric: bool,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_bits: int | None = None,
) -> QWeight:
    """GPTQ-quantize w [out, in] given H [in, in] (e.g. HessianAccumulator.hessian).

    With `scale_bits` (exact accumulation), each row's scale exponent is fixed up front from the
    unquantized row's min/max scales and every group's scale is snapped to that grid."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out, n = w.shape
    if tuple(H.shape) != (n, n):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match in-features {n}")
    if n % group_size:
        raise ValueError(f"in-features {n} not divisible by group_size {group_size}")
    if not 0.0 < damp < 1.0:
        raise ValueError(f"damp {damp} must be in (0, 1)")

    W = w.detach().float().clone()
    H = H.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    n_groups = n // group_size
    scale = torch.zeros(out, n_groups, dtype=torch.float32)
    zp = None if symmetric else torch.zeros(out, n_groups, dtype=torch.float32)

    exponent = None
    if scale_bits is not None:
        exponent = grid_exponent(weight_scales(W, bits, symmetric, group_size)[0], scale_bits)

    def set_group(g: int, block: torch.Tensor) -> None:
        s, z = weight_scales(block, bits, symmetric, group_size, scale_bits, exponent)
        scale[:, g] = s[:, 0]
        if zp is not None:
            zp[:, g] = z[:, 0]

    perm = None
    if act_order:
        for g in range(n_groups):  # static groups, original column order
            set_group(g, W[:, g * group_size : (g + 1) * group_size])
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype)
    U = _inverse_cholesky_upper(H).float()

    codes = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if perm is None:
                if col % group_size == 0:
                    set_group(col // group_size, W[:, col : col + group_size])  # W, not W1: as the reference
                g = col // group_size
            else:
                g = int(perm[col]) // group_size
            s = scale[:, g : g + 1]
            z = None if zp is None else zp[:, g : g + 1]
            wc = W1[:, i : i + 1]
            q = quantize(wc, s, z, bits, symmetric)
            codes[:, col : col + 1] = q
            err = (wc - dequantize(q, s, z)) / U1[i, i]
            W1[:, i:] -= err @ U1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QWeight(
        q=codes.to(torch.int8 if symmetric else torch.uint8),
        scale=scale,
        zero_point=None if zp is None else zp.to(torch.uint8),
        bits=bits,
        group_size=group_size,
    )


def gptq(w: torch.Tensor, H: torch.Tensor, cfg: WeightQuant, act_bits: int = 16) -> QWeight:
    """GPTQ as a recipe's weight section asks (bits, symmetric, granularity/group_size, cfg.gptq);
    `act_bits` as in `rtn`."""
    if cfg.bits == 16:
        raise ValueError("bits 16 means the weight is not quantized")
    return gptq_quantize(
        w,
        H,
        bits=cfg.bits,
        symmetric=cfg.symmetric,
        group_size=cfg.group_size_for(w.shape[1]),
        damp=cfg.gptq.damp,
        block_size=cfg.gptq.block_size,
        act_order=cfg.gptq.act_order,
        scale_bits=cfg.scale_bits_for(w.shape[1], act_bits),
    )
