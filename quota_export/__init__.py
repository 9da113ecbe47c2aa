"""quota_export: QUOTA joint low-bit quantization + visual-token pruning, lowered to ONNX / TensorRT."""

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input: the CLI prints `error: <message>` on one line and exits non-zero."""
