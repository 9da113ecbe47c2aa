"""`quota::TokenGather` TensorRT plugin: numpy reference, Triton kernel, TensorRT registration.

Only the reference is imported here; `kernel` needs triton and `plugin.register()` needs tensorrt.
"""

from .reference import select_kept, token_gather_reference

PLUGIN_ID = "quota::TokenGather"

__all__ = ["PLUGIN_ID", "select_kept", "token_gather_reference"]
