"""Architecture adapters: one small registered class per VLM family.

Nothing outside this package branches on architecture. An adapter knows how to get vision
features, merge them into the token embeddings, find the visual span, and hand out the decoder's
pieces (layers, norms, rotary tables) in a family-neutral form the reference and the lowering use.
"""

from __future__ import annotations

from pathlib import Path

from quota_export import UserError
from quota_export.models.base import Adapter, DecoderSpec  # noqa: F401

REGISTRY: dict[str, type[Adapter]] = {}


def register(arch: str):
    def deco(cls):
        REGISTRY[arch] = cls
        cls.architecture = arch
        return cls

    return deco


def load(path: str | Path, attn: str = "eager") -> Adapter:
    """Load an HF checkpoint folder (no network) and wrap it in its family's adapter."""
    import json

    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise UserError(f"{path}: model folder not found")
    if not cfg_file.is_file():
        raise UserError(f"{path}: not an HF checkpoint (no config.json)")
    try:
        archs = json.loads(cfg_file.read_text()).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file}: corrupt config.json ({e.__class__.__name__})") from None
    arch = next((a for a in archs if a in REGISTRY), None)
    if arch is None:
        raise UserError(
            f"{cfg_file}: unsupported architecture {archs or '(none)'}; supported: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[arch].from_pretrained(path)


# register the families
from quota_export.models import llava  # noqa: E402,F401
