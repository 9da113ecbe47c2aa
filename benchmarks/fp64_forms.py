"""The fp64 parts of the exact graphs, old form vs the form the lowering emits -> benchmarks/fp64_forms.md.

    python benchmarks/fp64_forms.py              # rewrites benchmarks/fp64_forms.md
    python benchmarks/fp64_forms.py --out -      # table on stdout

Each row is one primitive at the LLaVA-1.5 layout of benchmarks/latency.py (T = 616, 16 heads,
head_dim 64, intermediate 2816, 576 visual tokens, hidden 1024), one ONNX Runtime session per
form, one thread, the forms' runs interleaved (order shuffled per repeat). `old` is the form the
graphs had before (written out here), `new` the one `quota_export/ops/` emits now; `same bits`
compares their outputs on random inputs (fp32 outputs: bit for bit; fp64 probabilities: max
relative difference). torch's fp64 form is the reference of both.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T, H, D, INTER, NV, HID = 616, 16, 64, 2816, 576, 1024


def session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def graph(build, feeds, fp64=True):
    from onnx import TensorProto, helper

    from quota_export.ops.base import Emit
    from quota_export.ops.graph import Graph

    dt = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(np.uint8): TensorProto.UINT8}
    e = Emit(Graph("form"), fp64)
    names = [e.g.input(k, dt[v.dtype], list(v.shape)) for k, v in feeds.items()]
    for i, (t, odt) in enumerate(build(e, *names)):
        e.g.nodes.append(helper.make_node("Identity", [t], [f"out{i}"], name=f"/out{i}"))
        e.g.outputs.append(helper.make_tensor_value_info(f"out{i}", odt, None))
    return e.g.model(21)


# ---------------------------------------------------------------- the old forms, as they were emitted
def old_mask(e, s, offset):
    with e.scope("mask"):
        sh = e.op("Shape", [s])
        tq = e.op("Squeeze", [e.op("Slice", [sh, e.ax([2]), e.ax([3])]), e.ax([0])])
        tk = e.op("Squeeze", [e.op("Slice", [sh, e.ax([3]), e.ax([4])]), e.ax([0])])
        i = e.op("Range", [e.const(offset, np.int64), e.op("Add", [tq, e.const(offset, np.int64)]), e.const(1, np.int64)])
        j = e.op("Range", [e.const(0, np.int64), tk, e.const(1, np.int64)])
        cond = e.op("Greater", [e.op("Unsqueeze", [j, e.ax([0])]), e.op("Unsqueeze", [i, e.ax([1])])])
        return e.op("Where", [cond, e.hc(-np.inf), s])


def old_attention(e, q, k, v):
    from quota_export.ops.graph import FLOAT

    q, k, v = e.to_hp(q), e.to_hp(k), e.to_hp(v)
    s = e.op("MatMul", [q, e.op("Transpose", [k], perm=[0, 1, 3, 2])])
    s = e.op("Mul", [s, e.hc(np.full((1, H, 1, 1), D**-0.5))])
    p = e.op("Softmax", [old_mask(e, s, 0)], axis=-1)
    return [(e.to_f(e.op("MatMul", [p, v])), FLOAT)]


def old_silu(e, g, u):
    from quota_export.ops.graph import FLOAT

    gh = e.to_hp(g)
    return [(e.op("Mul", [e.to_f(e.op("Mul", [gh, e.op("Sigmoid", [gh])])), u]), FLOAT)]


def old_pack(e, q):
    from quota_export.ops.graph import UINT8

    qu8 = e.op("Cast", [q], to=UINT8)
    r = e.op("Reshape", [qu8, e.const([1, H, -1, D // 2, 2], np.int64)])
    lo, hi = e.op("Split", [r, e.const([1, 1], np.int64)], axis=-1, n_out=2)
    p = e.op("Add", [lo, e.op("Mul", [hi, e.const(16, np.uint8)])])
    return [(e.op("Squeeze", [p, e.ax([-1])]), UINT8)]


def old_unpack_dequant(e, p, s, z):
    from quota_export.ops.graph import FLOAT

    hi = e.op("Div", [p, e.const(16, np.uint8)])
    lo = e.op("Sub", [p, e.op("Mul", [hi, e.const(16, np.uint8)])])
    st = e.op("Concat", [e.op("Unsqueeze", [lo, e.ax([-1])]), e.op("Unsqueeze", [hi, e.ax([-1])])], axis=-1)
    q = e.op("Reshape", [st, e.const([1, H, -1, D], np.int64)])
    qf = e.op("Reshape", [e.op("Cast", [q], to=FLOAT), e.const([1, H, -1, 1, D], np.int64)])
    zz = e.op("Unsqueeze", [e.op("Cast", [z], to=FLOAT), e.ax([-1])])
    x = e.op("Mul", [e.op("Sub", [qf, zz]), e.op("Unsqueeze", [s, e.ax([-1])])])
    return [(e.op("Reshape", [x, e.const([1, H, -1, D], np.int64)]), FLOAT)]


# ---------------------------------------------------------------- the rows
def rows(rng):
    from quota_export.ops.attention import Heads, attend_onnx
    from quota_export.ops.graph import DOUBLE, FLOAT, UINT8
    from quota_export.ops.kv_cache import KVLayout, KVNames, kv_dequant_onnx, pack4_onnx
    from quota_export.ops.signals import cosine_onnx
    from quota_export.ops.swiglu import swiglu_onnx

    hd, kv = Heads(H, H, D), KVLayout(4, None, H, D)
    qkv = {x: rng.standard_normal((1, H, T, D)).astype(np.float32) for x in "qkv"}
    gu = {"g": (rng.standard_normal((1, T, INTER)) * 3).astype(np.float32), "u": rng.standard_normal((1, T, INTER)).astype(np.float32)}
    codes = {"q": rng.integers(0, 16, (1, H, T, D)).astype(np.float32)}
    packed = {"p": rng.integers(0, 256, (1, H, T, D // 2)).astype(np.uint8),
              "s": (rng.random((1, H, T, 1)) * 0.1 + 0.01).astype(np.float32),
              "z": rng.integers(0, 16, (1, H, T, 1)).astype(np.uint8)}
    acodes = {"c": np.clip(np.round(rng.standard_normal((1, T, HID)) * 3), -8, 7).astype(np.float32)}

    def new_pack(e, q):
        return [(e.op("Cast", [pack4_onnx(e, q, kv)], to=UINT8), UINT8)]

    return [
        ("causal attention, the layers' output [1,16,616,64]", qkv, old_attention,
         lambda e, q, k, v: [(attend_onnx(e, q, k, v, hd, 0, "attn", probs=False)[1], FLOAT)]),
        ("causal attention with probabilities (signals' form)", qkv, old_attention,
         lambda e, q, k, v: [(attend_onnx(e, q, k, v, hd, 0, "attn")[1], FLOAT)]),
        ("SiLU * up [616,2816]", gu, old_silu, lambda e, g, u: [(swiglu_onnx(e, g, u, "mlp"), FLOAT)]),
        ("KV4 pack [1,16,616,64]", codes, old_pack, new_pack),
        ("KV4 unpack + dequantize [1,16,616,32]", packed, old_unpack_dequant,
         lambda e, p, s, z: [(kv_dequant_onnx(e, KVNames(p, s, z), kv, "past"), FLOAT)]),
        ("code cosine [576 x 576 x 1024]", acodes, lambda e, c: [(cosine_onnx(e, c, 24, NV), DOUBLE)],
         lambda e, c: [(cosine_onnx(e, c, 24, NV, integer_codes=True), DOUBLE)]),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "fp64_forms.md"))
    a = ap.parse_args(argv)
    import onnxruntime

    rng = np.random.default_rng(a.seed)
    t0 = time.time()
    res = []
    order_rng = np.random.default_rng(a.seed + 1)
    for name, feeds, old, new in rows(rng):
        sess = {"old": session(graph(old, feeds)), "new": session(graph(new, feeds))}
        outs = {k: s.run(None, feeds)[0] for k, s in sess.items()}
        same = "yes" if np.array_equal(outs["old"], outs["new"]) else \
            f"no (max rel {np.max(np.abs(outs['old'] - outs['new']) / np.maximum(np.abs(outs['old']), 1e-300)):.1e})"
        ts = {"old": [], "new": []}
        order = ["old", "new"]
        for _ in range(a.repeats):
            order_rng.shuffle(order)
            for k in order:
                t = time.perf_counter()
                sess[k].run(None, feeds)
                ts[k].append(time.perf_counter() - t)
        ratio = float(np.median([n / o for n, o in zip(ts["new"], ts["old"])]))
        res.append((name, np.median(ts["old"]) * 1e3, np.median(ts["new"]) * 1e3, ratio, same))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# fp64 parts of the exact graphs: old form vs the emitted form (ONNX Runtime CPU, one thread)",
        "",
        f"Command: `python benchmarks/fp64_forms.py` ({a.repeats} interleaved repeats). Date: {now}. Run time "
        f"{(time.time() - t0) / 60:.1f} min. onnxruntime {onnxruntime.__version__}. What each form is: "
        "docs/numerics.md, \"What the fp64 reductions cost\".",
        "",
        "| primitive | old ms | new ms | new / old | same bits |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [f"| {n} | {o:.2f} | {w:.2f} | {r:.3f} | {s} |" for n, o, w, r, s in res]
    md = "\n".join(lines) + "\n"
    if a.out == "-":
        print(md)
    else:
        Path(a.out).write_text(md)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
