"""TensorRT registration of `quota::TokenGather` with the Python plugin API (`tensorrt.plugin`).

    register()   # once per process, before parsing an ONNX model with a quota::TokenGather node

- `@trtp.register`  shape/type descriptor: hidden_out [B, T-N+k, H] (dtype of hidden),
  position_ids_out [..., T-N+k] int64, kept [B, k] int64; k, start, n_visual are int attributes.
- `@trtp.autotune`  hidden fp32|fp16 (same dtype out), position_ids int64, scores fp32, linear.
- `@trtp.aot_impl`  returns the Triton kernel compiled to PTX with its launch parameters, so the
  engine embeds the kernel and runs without Python (TensorRT >= 10.8 AOT QDP path). The kernel
  signature is [inputs, int32 extra args, outputs]: the order TensorRT passes arguments in.

`tensorrt` and `triton` are imported inside the functions: this module imports without them.
Nothing here has run against a real TensorRT (none on the development machine); see README.
"""

from __future__ import annotations

from typing import List, Tuple, Union

PLUGIN_ID = "quota::TokenGather"
_registered = False


def register() -> None:
    """Register the plugin with TensorRT's plugin registry (idempotent)."""
    global _registered
    if _registered:
        return
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError(f"{PLUGIN_ID}: TensorRT (>= 10.8, with tensorrt.plugin) is not installed: {e}") from e

    @trtp.register(PLUGIN_ID)
    def token_gather_desc(
        hidden: trtp.TensorDesc,
        position_ids: trtp.TensorDesc,
        scores: trtp.TensorDesc,
        k: int,
        start: int,
        n_visual: int,
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        hidden_out = hidden.like()
        hidden_out.shape_expr[1] += k - n_visual
        position_ids_out = position_ids.like()
        position_ids_out.shape_expr[position_ids.ndim - 1] += k - n_visual
        kept = trtp.from_shape_expr((hidden.shape_expr[0], k), dtype=trt.int64)
        return hidden_out, position_ids_out, kept

    @trtp.autotune(PLUGIN_ID)
    def token_gather_autotune(
        hidden: trtp.TensorDesc,
        position_ids: trtp.TensorDesc,
        scores: trtp.TensorDesc,
        outputs: Tuple[trtp.TensorDesc],
    ) -> List[trtp.AutoTuneCombination]:
        # positions: hidden, position_ids, scores, hidden_out, position_ids_out, kept
        return [trtp.AutoTuneCombination("FP32|FP16, INT64, FP32, FP32|FP16, INT64, INT64", "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def token_gather_aot_impl(
        hidden: trtp.TensorDesc,
        position_ids: trtp.TensorDesc,
        scores: trtp.TensorDesc,
        k: int,
        start: int,
        n_visual: int,
        outputs: Tuple[trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        from .kernel import compile_kernel

        dtype = "fp16" if hidden.dtype == trt.float16 else "fp32"
        ck = compile_kernel(dtype, n_visual=n_visual, k=k, pos_planes=1 if position_ids.ndim == 2 else 3)
        b, t, h = hidden.shape_expr[0], hidden.shape_expr[1], hidden.shape_expr[2]
        params = trtp.KernelLaunchParams()
        params.grid_x = trtp.cdiv(t, ck.block_r)
        params.grid_y = b
        params.block_x = ck.num_warps * 32
        params.shared_mem = ck.shared
        # kernel int32 scalars T, H, B, start, resolved by TensorRT once shapes are known
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (t, h, b, start)])
        return ck.name.encode(), ck.ptx.encode(), params, extra

    _registered = True
