"""Checkpoint loading shared by the families: every problem with the folder is one UserError line.

    load_checkpoint(path, ConfigClass, ModelClass, "LLaVA") -> HF model (eager attention, eval)
    load_processor(path) -> AutoProcessor, or a registered stand-in when the family's processor
                            class cannot be built here (see PROCESSOR_FALLBACKS)
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from quota_export import UserError, one_line
from quota_export.models import quiet_hf

# processor_class (processor_config.json) -> callable(path) building an equivalent processor from
# the folder's tokenizer and image processor. transformers builds some processors (Qwen2-VL's) only
# with torchvision installed, for their video half; the image + text half needs none of it.
PROCESSOR_FALLBACKS: dict = {}


def weights_file(path: Path) -> Path:
    """The checkpoint's weights file, for messages (the folder when there are several)."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    return files[0] if len(files) == 1 else path


def load_checkpoint(path: Path, config_cls, model_cls, label: str):
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    cfg_file = path / "config.json"
    with quiet_hf():
        try:
            config = config_cls.from_pretrained(str(path))
        except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as e:
            raise UserError(f"{cfg_file}: invalid {label} config ({one_line(e)})") from None
        try:
            model, info = model_cls.from_pretrained(
                str(path), config=config, attn_implementation="eager",
                ignore_mismatched_sizes=True, output_loading_info=True,  # mismatches are reported below
            )
        except SafetensorError as e:
            raise UserError(f"{weights_file(path)}: corrupt or truncated weights ({one_line(e)})") from None
        except (pickle.UnpicklingError, EOFError) as e:
            raise UserError(f"{weights_file(path)}: corrupt weights ({one_line(e)})") from None
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{path}: cannot load weights ({one_line(e)})") from None
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        k, ckpt, want = mismatched[0]
        raise UserError(
            f"{weights_file(path)}: weights do not fit config.json: {k} is {list(ckpt)} in the checkpoint, "
            f"the config needs {list(want)} ({len(mismatched)} tensors differ)"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"{weights_file(path)}: {len(missing)} weights missing from the checkpoint (first: {missing[0]})")
    return model


def processor_class(path: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = Path(path) / name
        if f.is_file():
            try:
                c = json.loads(f.read_text(encoding="utf-8")).get("processor_class")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                continue
            if c:
                return c
    return None


def load_processor(path: str | Path):
    """AutoProcessor.from_pretrained(path); raises the loader's own exceptions (callers word them)."""
    from transformers import AutoProcessor

    with quiet_hf():
        try:
            return AutoProcessor.from_pretrained(str(path))
        except (ImportError, AttributeError):
            fb = PROCESSOR_FALLBACKS.get(processor_class(Path(path)) or "")
            if fb is None:
                raise
            return fb(Path(path))
