"""quota_export: QUOTA joint low-bit quantization + visual-token pruning, lowered to ONNX / TensorRT."""

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input: the CLI prints `error: <message>` on one line and exits non-zero."""


def one_line(e: BaseException, limit: int = 240) -> str:
    """An exception's message squeezed onto one line (or its type name), for one-line errors."""
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if not msg:
        return type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3].rstrip() + "..."


def versions(runtime: bool = False) -> dict[str, str]:
    """Versions of what made an artifact: this package, torch, transformers (+ onnx and
    onnxruntime with `runtime`, for built graphs)."""
    import torch
    import transformers

    out = {"quota_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    if runtime:
        import onnx
        import onnxruntime

        out.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return out
