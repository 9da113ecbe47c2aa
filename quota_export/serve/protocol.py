"""The served model's interface, the same for `serve` (PyTriton) and the exported repository:

    image           BYTES [1]   the image file's bytes (PNG, JPEG, ... as `run --image` reads)
    prompt          BYTES [1]   the question, UTF-8
    max_new_tokens  INT32 [1]   optional; default the recipe's export.max_new_tokens
    ->
    answer          BYTES [1]   the decoded answer, UTF-8 (what `run` prints)
    tokens          INT64 [-1]  the generated token ids (EOS included when reached)

Bad requests end in one line, `error: ...` naming the field, as `run` reports bad input.
"""

from __future__ import annotations

import io

import numpy as np

from quota_export import UserError

MODEL_NAME = "quota_vlm"

# (name, numpy dtype, Triton type, dims, optional)
INPUTS = (
    ("image", np.object_, "TYPE_STRING", (1,), False),
    ("prompt", np.object_, "TYPE_STRING", (1,), False),
    ("max_new_tokens", np.int32, "TYPE_INT32", (1,), True),
)
OUTPUTS = (
    ("answer", np.object_, "TYPE_STRING", (1,), False),
    ("tokens", np.int64, "TYPE_INT64", (-1,), False),
)


class RequestError(Exception):
    """A bad request, reported to the client as one line `error: <message>`.

    PyTriton sends a failed request's exception to the client as
    `traceback.format_exception(None, e, e.__traceback__)`; with no traceback that is
    `<module>.<qualname>: <message>`, so the class presents itself as `error`. The traceback stays
    out of the reply (it is an input problem, not a server fault)."""

    __module__ = "builtins"
    __qualname__ = "error"

    @property
    def __traceback__(self):  # noqa: D401 - read by traceback.format_exception only
        return None


def image_from_bytes(data: bytes) -> np.ndarray:
    """The image file's bytes -> uint8 HxWx3 RGB, as `data.load_image` reads a file."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UserError("image: empty (send the image file's bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
    except UnidentifiedImageError:
        raise UserError(f"image: {len(data)} bytes that are no image file (send a PNG, JPEG, ... file's bytes)") from None
    except OSError as e:
        raise UserError(f"image: cannot read the {len(data)} bytes as an image ({e})") from None


def _one(inputs: dict, name: str):
    if name not in inputs or inputs[name] is None:
        raise UserError(f"{name}: missing")
    a = np.asarray(inputs[name])
    if a.size != 1:
        raise UserError(f"{name}: expected one value, got shape {list(a.shape)}")
    return a.reshape(-1)[0]


def parse_request(inputs: dict, max_seq: int) -> tuple[np.ndarray, str, int | None]:
    """{input name: array} -> (image HxWx3, prompt, max_new_tokens or None), checked."""
    raw = _one(inputs, "image")
    if not isinstance(raw, (bytes, bytearray, np.bytes_)):
        raise UserError(f"image: expected BYTES (the image file's content), got {type(raw).__name__}")
    image = image_from_bytes(bytes(raw))
    p = _one(inputs, "prompt")
    try:
        prompt = p.decode("utf-8") if isinstance(p, (bytes, np.bytes_)) else str(p)
    except UnicodeDecodeError:
        raise UserError("prompt: not UTF-8 text") from None
    if not prompt.strip():
        raise UserError("prompt: empty")
    max_new = None
    if inputs.get("max_new_tokens") is not None:
        max_new = int(_one(inputs, "max_new_tokens"))
        if max_new < 1:
            raise UserError(f"max_new_tokens: must be at least 1, got {max_new}")
        if max_new > max_seq:
            raise UserError(f"max_new_tokens: at most {max_seq} (the build's export.max_seq), got {max_new}")
    return image, prompt, max_new


def answer_outputs(tokens: list[int], text: str) -> dict:
    return {"answer": np.array([text.encode("utf-8")], dtype=np.object_),
            "tokens": np.asarray(tokens, dtype=np.int64)}
