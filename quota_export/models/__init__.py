"""Architecture adapters: one small registered class per VLM family.

Nothing outside this package branches on architecture. An adapter knows how to get vision
features, merge them into the token embeddings, find the visual span, and hand out the decoder's
pieces (layers, norms, rotary tables) in a family-neutral form the reference and the lowering use.

Loading is the place where a bad checkpoint is met first, so every problem with the folder ends
here as one `UserError` line naming the file: no folder, no / corrupt config.json, an unregistered
architecture, a config the family cannot read, missing / truncated / mismatched weights.
"""

from __future__ import annotations

import contextlib
import json
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


@contextlib.contextmanager
def quiet_hf():
    """Silence transformers' load-time chatter (weight-loading bars, load reports, backend hints).

    Every condition those messages report that matters to us (missing / mismatched weights) is
    checked by the adapter and raised as a UserError instead.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def read_architectures(path: Path) -> list[str]:
    """config.json's `architectures`, with a one-line error for every way the file can be wrong."""
    cfg_file = path / "config.json"
    if not path.exists():
        raise UserError(f"{path}: model folder not found")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder (expected an HF checkpoint folder)")
    if not cfg_file.is_file():
        raise UserError(f"{path}: not an HF checkpoint (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file}: corrupt config.json (invalid JSON: {e.msg}, line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{cfg_file}: corrupt config.json (not UTF-8 text)") from None
    except OSError as e:
        raise UserError(f"{cfg_file}: cannot read ({e.strerror})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_file}: corrupt config.json (expected a JSON object, got {type(cfg).__name__})")
    archs = cfg.get("architectures")
    if isinstance(archs, str):
        archs = [archs]
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise UserError(f"{cfg_file}: field 'architectures' must be a list of class names")
    return archs or []


def load(path: str | Path, attn: str = "eager") -> Adapter:
    """Load an HF checkpoint folder (no network) and wrap it in its family's adapter."""
    path = Path(path)
    archs = read_architectures(path)
    arch = next((a for a in archs if a in REGISTRY), None)
    if arch is None:
        raise UserError(
            f"{path / 'config.json'}: unsupported architecture {archs or '(none given)'}; "
            f"supported: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[arch].from_pretrained(path)


# register the families
from quota_export.models import llava, llava_next, qwen2_vl  # noqa: E402,F401,I001
