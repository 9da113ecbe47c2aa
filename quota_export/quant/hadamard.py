"""QuaRot-style rotation of a Llama-style decoder: same function, incoherent activations.

    residual stream h  ->  h Q            (Q orthogonal: random-sign Hadamard, dim = hidden)

    embed_tokens        E      -> E Q                      (writes the stream)
    projector linear_2  W, b   -> Q^T W, Q^T b             (writes the stream: visual tokens)
    RMSNorm g           fused into the linears it feeds:  W -> W diag(g), g -> 1
    q/k/v, gate/up      W      -> W diag(g) Q              (read the stream)
    o_proj, down_proj   W, b   -> Q^T W, Q^T b             (write the stream)
    lm_head             W      -> W diag(g_final) Q        (reads the stream)

    down_proj, online:  y = (x H) (W H)^T = x W^T          (H orthogonal Hadamard, dim = intermediate)
                        -> HadamardLinear: an nn.Linear with weight W H and a buffer H;
                           forward(x) = linear(rotate_input(x)), rotate_input(x) = x @ H

RMSNorm commutes with Q (||h Q|| = ||h||), so with fused norm weights the rotated model
computes the same logits up to float rounding (all rotations are done in float64 and cast
back once). The activation quantizer of down_proj's input must sit after `rotate_input`.

`rotate_model` rotates an HF model in place; the deployed model (reference.py, the graphs) uses
`RotatedDecoder`, the same weights computed out of place, with the rotations of the decoder input
and of down_proj's input online (ops/rotate.py).

Not done here (QuaRot does it too): the online Hadamard on keys after RoPE. `rotate_model` also
leaves values alone; `RotatedDecoder` rotates them per head (v/o).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

# ---------------------------------------------------------------- Hadamard matrices


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % p for p in range(2, math.isqrt(q) + 1))


def _paley(m: int) -> torch.Tensor:
    """Paley construction I: a ±1 Hadamard matrix of order m = q + 1, q prime, q = 3 mod 4.

    Jacobsthal Q[i, j] = chi(j - i) (chi: quadratic character mod q; Q^T = -Q for q = 3 mod 4),
    S = [[0, 1^T], [-1, Q]], H = I + S.
    """
    q = m - 1
    chi = -torch.ones(q, dtype=torch.float64)
    chi[0] = 0.0
    chi[torch.tensor(sorted({(x * x) % q for x in range(1, q)}))] = 1.0
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]
    s = torch.zeros(m, m, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jac
    return torch.eye(m, dtype=torch.float64) + s


def _hadamard_factor(n: int) -> int | None:
    """The smallest m with n = 2^k * m and a known ±1 Hadamard of order m (m = 1, or a Paley
    order q + 1 with q prime = 3 mod 4: 12, 20, 24, 44, 48, 60, ...); None if none."""
    k = (n & -n).bit_length() - 1  # power of 2 in n
    for j in range(k, -1, -1):
        m = n >> j
        if m == 1 or (m % 4 == 0 and (m - 1) % 4 == 3 and _is_prime(m - 1)):
            return m
    return None


def is_hadamard_size(n: int) -> bool:
    """True if hadamard_matrix(n) is a true (scaled ±1) Hadamard matrix, not the orthogonal fallback."""
    return n >= 1 and _hadamard_factor(n) is not None


def hadamard_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """An orthonormal [n, n] float64 matrix (H @ H.T = I).

    For n = 2^k * m with m = 1 (Sylvester) or m = q + 1, q prime = 3 mod 4 (Paley I; covers
    12, 20, 24, 44, 48, 60, 224, ...): the Hadamard matrix H_{2^k} (x) P_m / sqrt(n); `seed` is unused.
    Other sizes (e.g. 18944 = 2^8 * 74): a random orthogonal matrix, QR of a Gaussian drawn from
    torch.Generator(seed) with the signs of diag(R) folded in (Haar-distributed; deterministic
    for a seed on one platform, LAPACK may differ in the last bits elsewhere). It spreads
    outliers like a Hadamard does but costs a dense matmul.
    """
    if n < 1:
        raise ValueError(f"size must be positive, got {n}")
    m = _hadamard_factor(n)
    if m is not None:
        h = _sylvester(n // m)
        if m > 1:
            h = torch.kron(h, _paley(m))
        return h / math.sqrt(n)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def hadamard_factor(n: int) -> tuple[int, torch.Tensor] | None:
    """(m, P) with hadamard_matrix(n) = kron(Sylvester H_{n/m}, P) / sqrt(n), P the ±1 [m, m] float64
    factor (Paley, or [[1]] for m = 1); None if n is not a Hadamard size (`is_hadamard_size`)."""
    m = _hadamard_factor(n) if n >= 1 else None
    if m is None:
        return None
    return m, (_paley(m) if m > 1 else torch.ones(1, 1, dtype=torch.float64))


def random_signs(n: int, seed: int) -> torch.Tensor:
    """The random ±1 diagonal of `random_hadamard(n, seed)` (float64 [n])."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """diag(random ±1) @ hadamard_matrix(n): the residual-stream rotation (orthonormal, float64)."""
    return random_signs(n, seed)[:, None] * hadamard_matrix(n, seed)


# ---------------------------------------------------------------- online Hadamard module


class HadamardLinear(nn.Linear):
    """An nn.Linear whose input is rotated online: forward(x) = F.linear(x @ H, W, b).

    Built from a linear whose weight already has H folded in (W H); shares its weight/bias
    Parameters, so module and parameter names stay those of the linear it replaces.
    """

    def __init__(self, H: torch.Tensor, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        if tuple(H.shape) != (linear.in_features, linear.in_features):
            raise ValueError(f"H {tuple(H.shape)} does not match in-features {linear.in_features}")
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("hadamard", H.to(device=linear.weight.device, dtype=torch.float32))

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.hadamard.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.rotate_input(x))


# ---------------------------------------------------------------- rotation


def _set(p: nn.Parameter, value: torch.Tensor) -> None:
    p.data = value.to(dtype=p.dtype, device=p.device).contiguous()


def _check_rmsnorm(norm: nn.Module) -> None:
    name = type(norm).__name__
    if "RMSNorm" not in name or "Gemma" in name or getattr(norm, "bias", None) is not None:
        raise ValueError(f"rotation needs Llama-style RMSNorm (x / rms * g); got {name}")


def _fuse_norm(norm: nn.Module, readers: Iterable[nn.Linear]) -> None:
    _check_rmsnorm(norm)
    g = norm.weight.detach().double()
    for lin in readers:
        _set(lin.weight, lin.weight.detach().double() * g[None, :])
    _set(norm.weight, torch.ones_like(g))


def _rotate_readers(readers: Iterable[nn.Linear], Q: torch.Tensor) -> None:
    for lin in readers:
        _set(lin.weight, lin.weight.detach().double() @ Q)


def _rotate_writers(writers: Iterable[nn.Linear], Q: torch.Tensor) -> None:
    for lin in writers:
        _set(lin.weight, Q.T @ lin.weight.detach().double())
        if lin.bias is not None:
            _set(lin.bias, lin.bias.detach().double() @ Q)


@torch.no_grad()
def rotate_decoder(
    embed: nn.Embedding,
    layers: Iterable[nn.Module],
    final_norm: nn.Module,
    lm_head: nn.Linear,
    extra_writers: Iterable[nn.Linear] = (),
    seed: int = 0,
) -> None:
    """Rotate a Llama-style decoder in place (layers with input_layernorm, self_attn.{q,k,v,o}_proj,
    post_attention_layernorm, mlp.{gate,up,down}_proj); `extra_writers` are other linears whose
    output is added to the residual stream (e.g. a VLM projector). down_proj becomes a HadamardLinear."""
    layers = list(layers)
    if any(isinstance(layer.mlp.down_proj, HadamardLinear) for layer in layers):
        raise ValueError("model is already rotated")
    if lm_head.weight is embed.weight or lm_head.weight.data_ptr() == embed.weight.data_ptr():
        raise ValueError("tied embeddings: untie lm_head first (rotate_model does)")
    Q = random_hadamard(embed.weight.shape[1], seed)

    _set(embed.weight, embed.weight.detach().double() @ Q)
    _rotate_writers(extra_writers, Q)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        readers = [attn.q_proj, attn.k_proj, attn.v_proj]
        _fuse_norm(layer.input_layernorm, readers)
        _rotate_readers(readers, Q)
        _rotate_writers([attn.o_proj], Q)
        readers = [mlp.gate_proj, mlp.up_proj]
        _fuse_norm(layer.post_attention_layernorm, readers)
        _rotate_readers(readers, Q)
        down = mlp.down_proj
        _rotate_writers([down], Q)
        Hd = hadamard_matrix(down.in_features, seed)
        _set(down.weight, down.weight.detach().double() @ Hd)
        mlp.down_proj = HadamardLinear(Hd, down)
    _fuse_norm(final_norm, [lm_head])
    _rotate_readers([lm_head], Q)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """Rotate a LlavaForConditionalGeneration (Llama-style text decoder) in place; returns it.

    Tied word embeddings are untied first (embedding and lm_head get different rotations and
    norm fusion) and `tie_word_embeddings` is set False in the configs.
    """
    inner = model.model
    lm = inner.language_model
    embed, lm_head = lm.embed_tokens, model.lm_head
    if lm_head.weight is embed.weight or lm_head.weight.data_ptr() == embed.weight.data_ptr():
        lm_head.weight = nn.Parameter(embed.weight.detach().clone())
        for cfg in (model.config, getattr(model.config, "text_config", None)):
            if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
                cfg.tie_word_embeddings = False
    rotate_decoder(
        embed, lm.layers, lm.norm, lm_head, extra_writers=[inner.multi_modal_projector.linear_2], seed=seed
    )
    return model




# ---------------------------------------------------------------- the deployed model's rotation

ROTATION_SEED = 0  # the seed of the residual stream's random signs (quant.activations.rotation)


class RotatedDecoder:
    """The decoder weights of `rotate_decoder`, computed out of place from an adapter (reference.py).

    The checkpoint's modules stay as they are (the embed and vision graphs, the FP reference and
    other schemes on the same adapter read them); the rotated fp32 copies live here, by parameter
    name (`<module>.weight`, `<module>.bias`), each rotated once in float64:

        q/k/v, gate/up   W diag(g) Q        o_proj   Q^T W (b Q)       down_proj   Q^T W H
        lm_head          W diag(g_final) Q  norms    g -> 1
        values per head  v_proj B_kv^T W (b B_kv), o_proj ... W B_h (B = blockdiag(H_head_dim) over the
                         kv / query heads; QuaRot's value rotation: the 4-bit value cache stores v H;
                         skipped if head_dim is not a Hadamard size)

    and the two online rotations (ops/rotate.py): `stream` = Q = diag(signs) H_hidden on the
    decoder input (QuaRot fuses it into the embeddings and the projector), `down` = H_intermediate
    before down_proj's activation quantizer.
    """

    def __init__(self, adapter, seed: int = ROTATION_SEED):
        from quota_export import UserError
        from quota_export.ops.rotate import Rotation

        sp = adapter.decoder_spec()
        bad = [f"{what} {n}" for what, n in (("hidden size", sp.hidden), ("intermediate size", sp.intermediate))
               if not is_hadamard_size(n)]
        if bad:
            raise UserError(
                f"quant.activations.rotation: hadamard needs the decoder's hidden and intermediate sizes to be "
                f"2^k * m with m = 1 or a Paley order (12, 20, 24, 44, ...); this model's {' and '.join(bad)} "
                "is not (use rotation: none)")
        self.stream = Rotation.of(sp.hidden, random_signs(sp.hidden, seed))
        self.down = Rotation.of(sp.intermediate)
        Q = self.stream.matrix()
        Hd = self.down.matrix()
        Hv = hadamard_matrix(sp.head_dim) if is_hadamard_size(sp.head_dim) else torch.eye(sp.head_dim, dtype=torch.float64)
        self.values_rotated = is_hadamard_size(sp.head_dim)
        Bkv, Bh = torch.block_diag(*[Hv] * sp.kv_heads), torch.block_diag(*[Hv] * sp.heads)
        names = {id(m): n for n, m in adapter.model.named_modules()}
        d = lambda t: t.detach().double()  # noqa: E731
        self.params: dict[str, torch.Tensor] = {}

        def put(module: nn.Module, w: torch.Tensor, b: torch.Tensor | None = None):
            self.params[f"{names[id(module)]}.weight"] = w.float().contiguous()
            if b is not None:
                self.params[f"{names[id(module)]}.bias"] = b.float().contiguous()

        for layer in adapter.layers():
            attn, mlp = layer.self_attn, layer.mlp
            for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                g = d(norm.weight)
                for lin in readers:
                    w = (d(lin.weight) * g[None, :]) @ Q
                    if lin is attn.v_proj:
                        put(lin, Bkv.T @ w, None if lin.bias is None else d(lin.bias) @ Bkv)
                    else:
                        put(lin, w)
            for lin, right in ((attn.o_proj, Bh), (mlp.down_proj, Hd)):
                put(lin, Q.T @ d(lin.weight) @ right, None if lin.bias is None else d(lin.bias) @ Q)
        head = adapter.lm_head()
        put(head, (d(head.weight) * d(adapter.final_norm().weight)[None, :]) @ Q)

    def weight(self, module_name: str) -> torch.Tensor | None:
        """The rotated fp32 weight of a module, None for modules the rotation leaves alone."""
        return self.params.get(f"{module_name}.weight")

    def bias(self, module_name: str) -> torch.Tensor | None:
        return self.params.get(f"{module_name}.bias")


__all__ = [
    "HadamardLinear", "ROTATION_SEED", "RotatedDecoder", "hadamard_factor", "hadamard_matrix", "is_hadamard_size",
    "random_hadamard", "random_signs", "rotate_decoder", "rotate_model",
]
