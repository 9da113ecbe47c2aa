"""One quantized linear on ONNX Runtime CPU, every exact form side by side -> benchmarks/intgemm.md.

    python benchmarks/intgemm.py                  # the full run, rewrites benchmarks/intgemm.md
    python benchmarks/intgemm.py --small --out -  # a quick smoke configuration, table on stdout

x fp32 [T, K] -> per-token symmetric activation codes (4- or 8-bit) -> times W [K, N] (4-bit
symmetric codes, scales per output channel or per group of 32/64/128 inputs, snapped for exact
accumulation as `build` snaps them) -> times the per-token scale. Forms:

    float       today's `onnx` target: QuantizeLinear(int4/int8) -> Cast float -> MatMul(DQ(int4 W))
                -> Mul s_tok (ORT fuses DQ + MatMul into MatMulNBits, accuracy level 1: fp32, exact)
    int         what `export.matmul: integer` lowers (quota_export/ops/linear.py): Div -> QuantizeLinear
                (scale 1, uint8 zero point 8/128) -> MatMulInteger(int8 weight planes: the codes times the
                integer digits of the snapped scales; one plane per channel scale, P side by side along N
                for group scales) -> Cast float -> Mul scale (planes: Reshape, Mul 2^(bj+e), ReduceSum)
                -> Mul s_tok
    int-mitf    the same with com.microsoft MatMulIntegerToFloat (b_scale = the plane factors) in place of
                MatMulInteger -> Cast -> Mul
    int-group   grouped scales only: one batched MatMulInteger per weight group ([G,T,g] x [G,g,N]) ->
                Cast -> Mul group scale -> ReduceSum over groups
    int-i32     grouped scales only: `int` with the planes summed in int32 (Mul 2^(bj), ReduceSum) before
                one Cast -> Mul 2^e_n -> Mul s_tok (exact: the sum is the float form's, below 2^24)

Every form's output is compared bit for bit with `float` (the column `exact`). Times are medians of
interleaved repeats; ratios are medians of per-repeat paired ratios against `float`, and fp32 (a plain
fp32 MatMul of x) is given for scale.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(form: str, T: int, K: int, N: int, group: int | None, a_bits: int, seed: int = 0):
    import torch

    from quota_export.ops.act_quant import act_quant_onnx, code_zero_point
    from quota_export.ops.base import Emit
    from quota_export.ops.graph import FLOAT, Graph
    from quota_export.ops.linear import integer_linear_onnx, integer_plan, integer_planes, linear_onnx, weight_onnx
    from quota_export.quant.quantizers import exact_scale_bits, quantize_weight

    torch.manual_seed(seed)
    w = torch.randn(N, K) * 0.02
    gs = group or K
    qw = quantize_weight(w, 4, True, gs, scale_bits=exact_scale_bits(K, 4, True, a_bits))
    e = Emit(Graph(form), fp64=False)
    g = e.g
    x = g.input("x", FLOAT, [1, T, K])
    if form == "fp32":
        g.output(g.op("MatMul", [x, g.init("w", w.T.numpy().copy())]), "y", FLOAT, [1, T, N])
        return g.model(21)
    if form == "float":  # what DecoderLowering emits with export.matmul: float
        q, s = act_quant_onnx(e, x, a_bits, K, "in")
        y = linear_onnx(e, q, weight_onnx(e, qw, None, "w"), s, None, "lin")
    else:
        codes, s = act_quant_onnx(e, x, a_bits, K, "in", uint8=True)
        zp = g.const(code_zero_point(a_bits), np.uint8)
        p = integer_plan(qw, a_bits)
        if form == "int":  # what DecoderLowering emits with export.matmul: integer
            y = integer_linear_onnx(e, codes, qw, p, a_bits, s, None, "lin")
        elif form == "int-mitf":  # com.microsoft MatMulIntegerToFloat, b_scale = the plane factors
            wp = g.init("planes", integer_planes(qw, p))
            y = g.op("MatMulIntegerToFloat", [codes, wp, g.const(1.0), g.init("f", p.factors.reshape(-1)), zp],
                     domain="com.microsoft")
            if p.planes > 1:
                y = g.op("ReduceSum", [g.op("Reshape", [y, g.const([0, 0, p.planes, N], np.int64)]),
                                       g.const([2], np.int64)], keepdims=0)
            y = g.op("Mul", [y, s])
        elif form == "int-i32":  # the planes summed in int32, one Cast
            from onnx import TensorProto

            wp = g.init("planes", integer_planes(qw, p))
            b = round(float(np.log2(p.factors[1, 0] / p.factors[0, 0]))) if p.planes > 1 else 0
            y = g.op("MatMulInteger", [codes, wp, zp])
            if p.planes > 1:
                y = g.op("Reshape", [y, g.const([0, 0, p.planes, N], np.int64)])
                y = g.op("Mul", [y, g.init("shift", (2 ** (b * np.arange(p.planes, dtype=np.int64)))[:, None].astype(np.int32))])
                y = g.op("ReduceSum", [y, g.const([2], np.int64)], keepdims=0)
            y = g.op("Mul", [g.op("Cast", [y], to=TensorProto.FLOAT), g.init("f", p.factors[0])])
            y = g.op("Mul", [y, s])
        else:  # int-group: one batched GEMM per weight group, then the group scales
            G = K // gs
            wg = g.init("wg", qw.q.numpy().T.reshape(G, gs, N).astype(np.int8))
            a = g.op("Transpose", [g.op("Reshape", [codes, g.const([-1, G, gs], np.int64)])], perm=[1, 0, 2])
            y = g.op("Cast", [g.op("MatMulInteger", [a, wg, zp])], to=FLOAT)
            y = g.op("Mul", [y, g.init("gsc", qw.scale.numpy().T[:, None, :].copy())])
            y = g.op("Unsqueeze", [g.op("ReduceSum", [y, g.const([0], np.int64)], keepdims=0), g.const([0], np.int64)])
            y = g.op("Mul", [y, s])
    g.output(y, "y", FLOAT, [1, T, N])
    return g.model(21)


def session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def measure(T, K, N, group, a_bits, threads, repeats, forms, rng):
    x = (np.random.default_rng(1).standard_normal((1, T, K)) * np.linspace(0.2, 3, K)).astype(np.float32)
    sess = {f: session(build(f, T, K, N, group, a_bits), threads) for f in forms}
    outs = {f: sess[f].run(None, {"x": x})[0] for f in forms}
    times = {f: [] for f in forms}
    inner = max(1, int(round(0.05 / max(1e-4, _once(sess["float"], x)))))
    for _ in range(repeats):
        order = list(forms)
        rng.shuffle(order)
        for f in order:
            t0 = time.perf_counter()
            for _ in range(inner):
                sess[f].run(None, {"x": x})
            times[f].append((time.perf_counter() - t0) / inner * 1e3)
    return outs, times


def _once(s, x):
    t0 = time.perf_counter()
    s.run(None, {"x": x})
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "intgemm.md"), help="markdown output ('-': stdout)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--small", action="store_true", help="small shapes (smoke test)")
    a = ap.parse_args(argv)
    import onnxruntime as ort

    if a.small:
        shapes = [(16, 256, 512), (1, 256, 512)]
        a.repeats = 2
    else:
        shapes = [(616, 1024, 2816), (616, 2816, 1024), (1, 1024, 2816), (1, 2816, 1024)]
    rng = random.Random(0)
    t0 = time.time()
    rows = []
    for threads in (1, 2):
        for a_bits in (4, 8):
            for T, K, N in shapes:
                for group in (None, 32, 64, 128):
                    if group is not None and group >= K:
                        continue
                    forms = ["fp32", "float", "int", "int-mitf"] + ([] if group is None else ["int-group", "int-i32"])
                    outs, times = measure(T, K, N, group, a_bits, threads, a.repeats, forms, rng)
                    for f in forms:
                        if f == "fp32":
                            continue
                        ratio = statistics.median(x / y for x, y in zip(times[f], times["float"]))
                        r32 = statistics.median(x / y for x, y in zip(times[f], times["fp32"]))
                        same = "ref" if f == "float" else ("yes" if np.array_equal(outs[f], outs["float"]) else "NO")
                        rows.append((threads, a_bits, f"{T}x{K}x{N}", "channel" if group is None else str(group), f,
                                     statistics.median(times[f]), statistics.median(times["fp32"]), r32, ratio, same))
                    print(rows[-1], file=sys.stderr)
    secs = time.time() - t0
    lines = [
        "# One quantized linear on ONNX Runtime CPU: today's float form vs integer GEMMs",
        "",
        f"Command: `python benchmarks/intgemm.py{' --small' if a.small else ''}` ({a.repeats} interleaved repeats "
        f"per configuration, order shuffled). Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
        f"Run time {secs / 60:.1f} min. onnxruntime {ort.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}.",
        "",
        "W: 4-bit symmetric codes, scales snapped for exact accumulation (`exact_scale_bits`), per output channel "
        "or per group of inputs. A: per-token symmetric codes of `a bits`. `exact`: the form's output equals "
        "`float`'s bit for bit. `vs fp32`: against a plain fp32 MatMul in the same run; `vs float`: against "
        "today's form (medians of per-repeat paired ratios). Forms: see the script's docstring.",
        "",
        "| threads | a bits | T x K x N | W scales | form | median ms | fp32 ms | vs fp32 | vs float | exact |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.3f} | {r[8]:.3f} | {r[9]} |")
    text = "\n".join(lines) + "\n"
    if a.out == "-":
        print(text)
    else:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
