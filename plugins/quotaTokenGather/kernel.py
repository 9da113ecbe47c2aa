"""Triton kernel of `quota::TokenGather`: top-k visual-token selection and row gather in one launch.

One program per (block of BLOCK_R input rows, batch row). A program whose rows touch the visual
span [start, start+N) first selects the kept tokens of its batch row, all N scores in registers
(N is a compile-time constant, padded to N_PAD = next power of two):

    key_i  = order-preserving int32 of s_i   (sign-magnitude -> two's complement; -0.0 == +0.0;
                                              NaN -> key(-inf), i.e. NaN ranks as -inf)
    thr    = k-th largest key                (31-step bitwise search, each step one count over N)
    kept_i = key_i > thr  or  (key_i == thr  and  #{j < i : key_j == thr} < k - #{key > thr})

which is exactly "rank_i < k" with rank_i = #{j : s_j > s_i or (s_j == s_i and j < i)} (ONNX TopK,
largest=1, sorted=1: lower index wins ties). The output slot of a kept token is the number of kept
tokens before it (a prefix count), so kept tokens stay in their original order. Then every input
row is copied once to its output row (text rows shift by k - N after the span, dropped visual rows
are not written): rows are written by exactly one program, nothing is atomic, the result is
deterministic. Cost per program: O(32 * N_PAD) for the selection + O(BLOCK_R * H) for the copy.

The kernel signature is [inputs..., int32 scalars..., outputs..., constexprs...], the order
TensorRT's AOT plugin path passes arguments in (see plugin.py).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import triton
import triton.language as tl

BLOCK_R = 16  # input rows per program
MAX_N_VISUAL = 4096  # all N scores of a batch row live in registers of one program
# PTX ISA of the AOT kernel: 8.0 (CUDA 12.0) is the oldest that can target sm_90a, so the PTX loads
# on any CUDA 12+ driver. Left to itself Triton 3.9 writes the ISA of its bundled ptxas (8.8 for
# sm_80, 9.4 for sm_90), which a CUDA 13.0 ptxas or an older driver rejects.
PTX_VERSION = 80


@triton.jit
def _order_key(s):
    """fp32 -> int32 key with key(a) < key(b) iff a < b; -0.0 and +0.0 map to 0; NaN to key(-inf)."""
    bits = s.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    key = tl.where(bits < 0, -mag, mag)
    return tl.where(mag > 0x7F800000, -0x7F800000, key)


@triton.jit
def token_gather_kernel(
    hidden_ptr,  # [B, T, H] fp32 | fp16
    pos_ptr,  # [POS_PLANES, B, T] int64 (POS_PLANES = 1: [B, T])
    scores_ptr,  # [B, N] fp32
    T,  # int32 scalars: sequence length in, hidden size, batch, visual span start
    H,
    B,
    start,
    hidden_out_ptr,  # [B, T - N + K, H]
    pos_out_ptr,  # [POS_PLANES, B, T - N + K] int64
    kept_ptr,  # [B, K] int64
    N: tl.constexpr,
    K: tl.constexpr,
    N_PAD: tl.constexpr,
    POS_PLANES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_r = tl.program_id(0)
    b = tl.program_id(1)
    t_out = T - N + K
    r0 = pid_r * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    in_t = rows < T
    v = rows - start  # visual index of each row (valid where in_vis)
    in_vis = in_t & (v >= 0) & (v < N)

    kept_lane = tl.zeros([BLOCK_R], dtype=tl.int1)
    pos_lane = tl.zeros([BLOCK_R], dtype=tl.int32)
    if (r0 < start + N) & (r0 + BLOCK_R > start):
        # ---- selection over the whole visual span of batch row b
        j = tl.arange(0, N_PAD)
        jv = j < N
        key = _order_key(tl.load(scores_ptr + b * N + j, mask=jv, other=0.0))
        n_nonneg = tl.sum((jv & (key >= 0)).to(tl.int32), axis=0)
        thr = tl.where(n_nonneg >= K, 0, -2147483648)
        for i in range(31):  # greedy bitwise search: largest thr with #{key >= thr} >= K
            cand = thr | (1 << (30 - i))
            cnt = tl.sum((jv & (key >= cand)).to(tl.int32), axis=0)
            thr = tl.where(cnt >= K, cand, thr)
        gt = jv & (key > thr)
        eq = (jv & (key == thr)).to(tl.int32)
        need = K - tl.sum(gt.to(tl.int32), axis=0)  # how many of the threshold ties are kept
        kept_all = gt | ((eq != 0) & ((tl.cumsum(eq, axis=0) - eq) < need))
        v0 = r0 - start  # first visual index of this program's rows (may be < 0)
        eq_before = tl.sum(tl.where(j < v0, eq, 0), axis=0)
        kept_before = tl.sum(tl.where((j < v0) & kept_all, 1, 0), axis=0)
        # ---- the same decision for this program's own visual rows, and their output slots
        key_l = _order_key(tl.load(scores_ptr + b * N + v, mask=in_vis, other=0.0))
        eq_l = (in_vis & (key_l == thr)).to(tl.int32)
        eq_rank = eq_before + tl.cumsum(eq_l, axis=0) - eq_l
        kept_lane = (in_vis & (key_l > thr)) | ((eq_l != 0) & (eq_rank < need))
        kl = kept_lane.to(tl.int32)
        pos_lane = kept_before + tl.cumsum(kl, axis=0) - kl

    head = in_t & (rows < start)
    tail = in_t & (rows >= start + N)
    dest = tl.where(head, rows, tl.where(tail, rows - N + K, start + pos_lane))
    write = head | tail | kept_lane

    tl.store(kept_ptr + b * K + pos_lane, v.to(tl.int64), mask=kept_lane)
    for p in tl.static_range(POS_PLANES):
        plane = (p * B + b).to(tl.int64)
        pid = tl.load(pos_ptr + plane * T + rows, mask=write)
        tl.store(pos_out_ptr + plane * t_out + dest, pid, mask=write)
    src = (b.to(tl.int64) * T + rows) * H
    dst = (b.to(tl.int64) * t_out + dest) * H
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        m = write[:, None] & (hh < H)[None, :]
        x = tl.load(hidden_ptr + src[:, None] + hh[None, :], mask=m)
        tl.store(hidden_out_ptr + dst[:, None] + hh[None, :], x, mask=m)


def launch_config(n_visual: int, k: int, hidden_size: int | None = None) -> dict:
    """Compile-time parameters for a plugin instance (N and k are attributes, so constants)."""
    if not 1 <= n_visual <= MAX_N_VISUAL:
        raise ValueError(f"n_visual={n_visual} out of range [1, {MAX_N_VISUAL}]")
    if not 1 <= k <= n_visual:
        raise ValueError(f"k={k} out of range [1, n_visual={n_visual}]")
    n_pad = triton.next_power_of_2(n_visual)
    block_h = 128 if hidden_size is None else min(128, triton.next_power_of_2(hidden_size))
    return dict(
        N=n_visual, K=k, N_PAD=n_pad, BLOCK_R=BLOCK_R, BLOCK_H=block_h,
        num_warps=max(4, min(16, n_pad // 256)),  # N_PAD / (32 * num_warps) <= 8 score lanes per thread
    )  # fmt: skip


def token_gather(hidden, position_ids, scores, *, k: int, start: int, n_visual: int):
    """Run the kernel on torch tensors (a GPU, or CPU tensors under TRITON_INTERPRET=1).

    Returns (hidden_out, position_ids_out, kept) like `reference.token_gather_reference`.
    """
    import torch

    b, t, h = hidden.shape
    if hidden.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"hidden must be float32 or float16, got {hidden.dtype}")
    if tuple(scores.shape) != (b, n_visual) or scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32 [{b}, {n_visual}], got {scores.dtype} {tuple(scores.shape)}")
    if tuple(position_ids.shape) not in ((b, t), (3, b, t)) or position_ids.dtype != torch.int64:
        raise ValueError(f"position_ids must be int64 [B, T] or [3, B, T], got {tuple(position_ids.shape)}")
    if not (0 <= start and start + n_visual <= t):
        raise ValueError(f"visual span [{start}, {start + n_visual}) outside [0, {t})")
    cfg = launch_config(n_visual, k, h)
    t_out = t - n_visual + k
    hidden, position_ids, scores = hidden.contiguous(), position_ids.contiguous(), scores.contiguous()
    hidden_out = torch.empty((b, t_out, h), dtype=hidden.dtype, device=hidden.device)
    pos_out = torch.empty(tuple(position_ids.shape[:-1]) + (t_out,), dtype=torch.int64, device=hidden.device)
    kept = torch.empty((b, k), dtype=torch.int64, device=hidden.device)
    grid = (triton.cdiv(t, cfg["BLOCK_R"]), b)
    token_gather_kernel[grid](
        hidden, position_ids, scores, t, h, b, start, hidden_out, pos_out, kept,
        POS_PLANES=1 if position_ids.dim() == 2 else 3, **cfg,
    )  # fmt: skip
    return hidden_out, pos_out, kept


# ------------------------------------------------------------------------------- AOT (no GPU needed)


@dataclass(frozen=True)
class CompiledKernel:
    name: str  # entry point in the PTX
    ptx: str
    arch: int  # 80 -> sm_80
    num_warps: int
    shared: int  # dynamic shared memory bytes to launch with
    block_r: int  # rows per program: grid = (cdiv(T, block_r), B)


def compile_kernel(
    dtype: str, *, n_visual: int, k: int, pos_planes: int = 1, arch: int | None = None, ptx_version: int = PTX_VERSION
) -> CompiledKernel:
    """Compile the kernel ahead of time to PTX for sm_<arch> (works on a CPU-only machine).

    `dtype` is the hidden dtype, "fp32" or "fp16". T, H, B and start stay runtime int32 arguments.
    `arch` None: the current GPU's (TensorRT builds an engine for the GPU it builds on). Triton
    targets sm_90a for arch 90 (so that PTX runs on sm_90 only; it uses no sm_90a feature).
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_kernel needs TRITON_INTERPRET unset (the interpreter has no compiler)")
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"dtype must be fp32 or fp16, got {dtype!r}")
    from triton.backends.compiler import GPUTarget

    if arch is None:
        arch = triton.runtime.driver.active.get_current_target().arch
    cfg = launch_config(n_visual, k)
    num_warps = cfg.pop("num_warps")
    constexprs = dict(cfg, POS_PLANES=pos_planes)
    signature = {
        "hidden_ptr": f"*{dtype}", "pos_ptr": "*i64", "scores_ptr": "*fp32",
        "T": "i32", "H": "i32", "B": "i32", "start": "i32",
        "hidden_out_ptr": f"*{dtype}", "pos_out_ptr": "*i64", "kept_ptr": "*i64",
        **{name: "constexpr" for name in constexprs},
    }  # fmt: skip
    src = triton.compiler.ASTSource(fn=token_gather_kernel, signature=signature, constexprs=constexprs)
    ck = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "enable_fp_fusion": False, "ptx_version": ptx_version},
    )
    return CompiledKernel(
        name=ck.metadata.name, ptx=ck.asm["ptx"], arch=arch, num_warps=ck.metadata.num_warps,
        shared=ck.metadata.shared, block_r=cfg["BLOCK_R"],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """`python -m plugins.quotaTokenGather.kernel --arch 80 --dtype fp16 --n-visual 576 --k 144 --out x.ptx`"""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=80)
    ap.add_argument("--ptx-version", type=int, default=PTX_VERSION)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--n-visual", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--pos-planes", type=int, default=1, choices=[1, 3])
    ap.add_argument("--out", help="write the PTX here")
    a = ap.parse_args(argv)
    ck = compile_kernel(
        a.dtype, n_visual=a.n_visual, k=a.k, pos_planes=a.pos_planes, arch=a.arch, ptx_version=a.ptx_version
    )
    if a.out:
        with open(a.out, "w") as f:
            f.write(ck.ptx)
    print(json.dumps(dict(name=ck.name, arch=ck.arch, num_warps=ck.num_warps, shared=ck.shared, ptx_bytes=len(ck.ptx))))


if __name__ == "__main__":
    main()
