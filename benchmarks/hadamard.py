"""The online Hadamard on ONNX Runtime: the ops/rotate.py subgraph vs a constant MatMul.

    python benchmarks/hadamard.py [--tokens 616] [--sizes 192 512 1024 2816] [--reps 20]
        [--threads 1] [--out benchmarks/hadamard.md]

Per size n (the shipped model's hidden 192 = 2^4 * Paley 12 and intermediate 512; the latency
benchmark's hidden 1024 and intermediate 2816 = 2^6 * Paley 44), x [1, T, n] fp32 -> x H, in one
ONNX Runtime session each (CPU, the runner's session options), median of --reps runs:
  fwht fp64   rotate_onnx with fp64 reductions (what the graphs hold with export.reductions: fp64)
  fwht fp32   rotate_onnx with fp32 reductions
  matmul fp64 Cast -> MatMul(constant H, float64) -> Cast (the dense alternative, same precision)
  matmul fp32 MatMul(constant H, float32)
and whether each output equals the torch reference `rotate` bit for bit (the MatMul forms are not
that form, so they are compared to it only to within float rounding: max |diff|).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _session(build, n: int, fp64: bool, threads: int):
    import onnxruntime as ort
    from onnx import helper

    from quota_export.ops.base import Emit
    from quota_export.ops.graph import FLOAT, Graph
    from quota_export.runtime.ort import SESSION_CONFIG

    e = Emit(Graph("hadamard"), fp64)
    x = e.g.input("x", FLOAT, [1, "T", n])
    y = build(e, x)
    e.g.nodes.append(helper.make_node("Identity", [y], ["y"], name="/out"))
    e.g.outputs.append(helper.make_tensor_value_info("y", FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    for k, v in SESSION_CONFIG.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(e.g.model(21).SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=616)
    ap.add_argument("--sizes", type=int, nargs="+", default=[192, 512, 1024, 2816])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "hadamard.md")
    a = ap.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    from quota_export.ops.graph import DOUBLE
    from quota_export.ops.rotate import Rotation, rotate, rotate_onnx

    lines = [
        "# The online Hadamard on ONNX Runtime: butterflies vs a constant MatMul", "",
        f"`python benchmarks/hadamard.py --tokens {a.tokens} --reps {a.reps}` (docstring: the forms). "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
        f"{a.threads} thread(s); x [1, {a.tokens}, n] fp32, median of {a.reps} runs.", "",
        "| n | m (Paley) | fwht fp64 ms | matmul fp64 ms | fwht fp32 ms | matmul fp32 ms | fwht fp64 / matmul fp64 "
        "| fwht = torch bits (fp64, fp32) | matmul max abs diff (fp64, fp32) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in a.sizes:
        rot = Rotation.of(n)
        H = rot.matrix().numpy()
        x = (torch.randn(1, a.tokens, n, generator=torch.Generator().manual_seed(n)) * 3).numpy()
        forms = {
            "fwht64": (lambda e, x_: rotate_onnx(e, x_, rot, "rotate"), True),
            "mm64": (lambda e, x_: e.to_f(e.op("MatMul", [e.op("Cast", [x_], to=DOUBLE), e.init("h", H)])), True),
            "fwht32": (lambda e, x_: rotate_onnx(e, x_, rot, "rotate"), False),
            "mm32": (lambda e, x_: e.op("MatMul", [x_, e.init("h", H.astype(np.float32))]), False),
        }
        ms, outs = {}, {}
        for name, (build, fp64) in forms.items():
            sess = _session(build, n, fp64, a.threads)
            outs[name] = sess.run(None, {"x": x})[0]
            times = []
            for _ in range(a.reps):
                t = time.perf_counter()
                sess.run(None, {"x": x})
                times.append(time.perf_counter() - t)
            ms[name] = 1e3 * statistics.median(times)
        ref = {p: rotate(torch.from_numpy(x), rot, p).numpy() for p in (torch.float64, torch.float32)}
        same = [np.array_equal(outs["fwht64"], ref[torch.float64]), np.array_equal(outs["fwht32"], ref[torch.float32])]
        diff = [float(np.abs(outs["mm64"] - ref[torch.float64]).max()), float(np.abs(outs["mm32"] - ref[torch.float32]).max())]
        lines.append(f"| {n} | {rot.m} | {ms['fwht64']:.3f} | {ms['mm64']:.3f} | {ms['fwht32']:.3f} | {ms['mm32']:.3f} | "
                     f"{ms['fwht64'] / ms['mm64']:.3f} | {same[0]}, {same[1]} | {diff[0]:.2g}, {diff[1]:.2g} |")
        print(lines[-1], file=sys.stderr, flush=True)
    a.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
