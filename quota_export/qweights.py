"""Calibrated (GPTQ) weights stored beside the recipe: `<recipe stem>.weights.safetensors`.

    calibrate --weights gptq --> r.yaml  (quant.weights.algorithm: gptq, calibrated: r.weights.safetensors)
                                 r.weights.safetensors
    build / verify / eval   --> load_qweights(recipe, adapter, cfg) -> {module name: QWeight} -> Deployed

The file holds, per quantized module `<name>` (as `named_modules()` spells it):

    <name>.q            int8 [out, in] codes (uint8 when asymmetric), one value per weight
    <name>.scale        fp32 [out, in/g] group scales (g = in for per-channel)
    <name>.zero_point   uint8 [out, in/g], asymmetric only

and one metadata entry `quota_export`: a JSON object (sorted keys) with the format tag, bits,
symmetric, granularity, group_size, accumulation and activation bits the codes were made for, a
sha256 of the model's original weights of those modules, the GPTQ arguments and what it was
calibrated on. One metadata key only: safetensors writes several keys in a random order, and
the file must be byte-identical for the same inputs.

Every check (missing, unreadable, other modules, shapes, bits, group size, scales off the exact-
accumulation grid, another model's weights) is one `UserError` line naming
`quant.weights.calibrated` and the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from quota_export import UserError
from quota_export.quant.quantizers import QWeight, qrange

FORMAT = "quota_export.qweights/1"
FIELD = "quant.weights.calibrated"


def file_name(recipe_path: str | Path) -> str:
    """The weights file's name for a recipe written to `recipe_path`: `<stem>.weights.safetensors`."""
    return f"{Path(recipe_path).stem}.weights.safetensors"


def model_hash(adapter, names: list[str]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of the checkpoint's weights of `names`, by name."""
    mods = dict(adapter.model.named_modules())
    h = hashlib.sha256()
    for n in sorted(names):
        w = mods[n].weight.detach().contiguous()
        h.update(f"{n}|{w.dtype}|{list(w.shape)}\n".encode())
        h.update(w.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weight_meta(wq, a_bits: int, adapter, names: list[str], rotation: str = "none", **extra) -> dict:
    """The metadata a weights file carries (wq: the recipe's resolved WeightQuant; rotation:
    quant.activations.rotation, the codes are of the rotated weights with hadamard)."""
    return {
        "format": FORMAT,
        "algorithm": wq.algorithm,
        "bits": wq.bits,
        "symmetric": wq.symmetric,
        "granularity": wq.granularity,
        "group_size": wq.group_size,
        "accumulation": wq.accumulation,
        "act_bits": a_bits,
        "rotation": rotation,
        "gptq": wq.gptq.model_dump(mode="python"),
        "model_sha256": model_hash(adapter, names),
        "modules": len(names),
        **extra,
    }


def save_with_recipe(recipe, qweights: dict[str, QWeight], meta: dict, out: str | Path):
    """Write the weights to `<out stem>.weights.safetensors` beside `out`, then the recipe naming
    it (quant.weights.calibrated) to `out`; returns (recipe as written, weights path)."""
    from quota_export.recipe import save_recipe

    out = Path(out)
    name = file_name(out)
    q = recipe.quant.model_copy(deep=True)
    q.weights = q.weights.model_copy(update={"calibrated": name})
    recipe = recipe.model_copy(update={"quant": q})
    save_qweights(out.parent / name, qweights, meta)
    save_recipe(recipe, out)
    return recipe, out.parent / name


def save_qweights(path: str | Path, qweights: dict[str, QWeight], meta: dict) -> None:
    """Write `qweights` (+ `meta`) to a safetensors file, deterministically (tensors by name)."""
    from safetensors.torch import save_file

    tensors = {}
    for n in sorted(qweights):
        qw = qweights[n]
        tensors[f"{n}.q"] = qw.q.contiguous()
        tensors[f"{n}.scale"] = qw.scale.float().contiguous()
        if qw.zero_point is not None:
            tensors[f"{n}.zero_point"] = qw.zero_point.to(torch.uint8).contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"quota_export": json.dumps(meta, sort_keys=True)})


def load_qweights(recipe, adapter, cfg) -> dict[str, QWeight]:
    """The recipe's calibrated weights, checked against the recipe (`cfg` = its DeployConfig) and
    the model; any problem -> one UserError line."""
    wq = recipe.resolved_quant().weights
    if wq.calibrated is None:
        raise UserError(
            f"{FIELD}: algorithm {wq.algorithm} needs the calibrated weights file "
            "(python -m quota_export calibrate --weights gptq writes it beside the recipe)"
        )
    path = recipe.weights_path()

    def bad(msg: str) -> UserError:
        return UserError(f"{FIELD}: {path}: {msg}")

    if not path.is_file():
        raise bad("no such weights file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise bad(f"not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        meta = json.loads(raw_meta["quota_export"])
        if meta.get("format") != FORMAT:
            raise ValueError
    except (KeyError, ValueError, TypeError, AttributeError):
        raise bad(f"not a quota_export weights file (no '{FORMAT}' metadata)") from None

    for key, want in (("algorithm", wq.algorithm), ("bits", wq.bits), ("symmetric", wq.symmetric),
                      ("granularity", wq.granularity), ("accumulation", wq.accumulation),
                      ("act_bits", cfg.a_bits)):
        if meta.get(key) != want:
            raise bad(f"made for {key} {meta.get(key)}, the recipe has {want}")
    rot = cfg.quant.activations.rotation
    if meta.get("rotation", "none") != rot:  # files written before rotation existed: none
        raise bad(f"made for quant.activations.rotation {meta.get('rotation', 'none')}, the recipe has {rot}")
    if wq.granularity == "group" and meta.get("group_size") != wq.group_size:
        raise bad(f"made for group_size {meta.get('group_size')}, the recipe has {wq.group_size}")

    mods = dict(adapter.model.named_modules())
    names = cfg.weights.quantized(list(mods))
    have = sorted({k.rsplit(".", 1)[0] for k in tensors})
    missing = [n for n in names if n not in have]
    extra = [n for n in have if n not in names]
    if missing or extra:
        what = "; ".join(s for s in (
            f"missing {len(missing)} module(s) the recipe quantizes, e.g. {missing[0]}" if missing else "",
            f"{len(extra)} module(s) the recipe does not quantize, e.g. {extra[0]}" if extra else "",
        ) if s)
        raise bad(what)

    res = {}
    for n in names:
        res[n] = _check_module(n, tensors, mods[n].weight, wq, cfg, bad)
    if meta.get("model_sha256") != model_hash(adapter, names):
        raise bad(f"made for other weights than {recipe.model_path()} (model_sha256 differs)")
    return res


def _check_module(n: str, tensors: dict, weight, wq, cfg, bad) -> QWeight:
    out, k = weight.shape
    g = wq.group_size_for(k)
    q, scale, zp = tensors.get(f"{n}.q"), tensors.get(f"{n}.scale"), tensors.get(f"{n}.zero_point")
    code_dtype = torch.int8 if wq.symmetric else torch.uint8
    if q is None or scale is None:
        raise bad(f"{n}: needs both {n}.q and {n}.scale")
    if q.dtype != code_dtype or tuple(q.shape) != (out, k):
        raise bad(f"{n}.q: {q.dtype} {list(q.shape)}, the model needs {code_dtype} {[out, k]}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (out, k // g):
        raise bad(f"{n}.scale: {scale.dtype} {list(scale.shape)}, group size {g} needs float32 {[out, k // g]}")
    if wq.symmetric != (zp is None):
        raise bad(f"{n}: {'has' if zp is not None else 'lacks'} zero points, the recipe's weights are "
                  f"{'symmetric' if wq.symmetric else 'asymmetric'}")
    if zp is not None and (zp.dtype != torch.uint8 or zp.shape != scale.shape):
        raise bad(f"{n}.zero_point: {zp.dtype} {list(zp.shape)}, needs uint8 {list(scale.shape)}")
    lo, hi = qrange(wq.bits, wq.symmetric)
    if int(q.min()) < lo or int(q.max()) > hi or (zp is not None and int(zp.max()) > hi):
        raise bad(f"{n}: codes outside the {wq.bits}-bit range [{lo}, {hi}]")
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise bad(f"{n}.scale: scales must be finite and positive")
    sb = cfg.weights.scale_bits_for(k, cfg.a_bits)
    if sb is not None and not on_grid(scale, sb):
        raise bad(f"{n}.scale: scales are not on the exact-accumulation grid (m * 2^e, m < 2^{sb}, one e per row)")
    return QWeight(q=q, scale=scale, zero_point=zp, bits=wq.bits, group_size=g)


def on_grid(scale: torch.Tensor, scale_bits: int) -> bool:
    """True if every row of scale [out, n_groups] is m_g * 2^e with integers 1 <= m_g < 2^B and one
    e per row (quant/quantizers.py `snap_scales`): the finest power of two dividing all the row's
    scales must leave the largest below 2^B."""
    m, e = torch.frexp(scale.double())  # scale = m * 2^e, m in [0.5, 1)
    mi = (m * 2.0**53).to(torch.int64)  # the mantissa as an integer (exact)
    tz = torch.log2((mi & -mi).double())  # its trailing zero bits (lowest set bit, a power of two)
    low = (e - 53 + tz).amin(dim=1, keepdim=True)  # the finest power of two dividing the row's scales
    return bool((torch.ldexp(scale.double(), -low).amax(dim=1) <= 2**scale_bits - 1).all())
