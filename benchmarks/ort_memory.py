"""ONNX Runtime's memory for one decoder session, by how the graph is stored and session options.

    flock /tmp/quota-heavy.lock python benchmarks/ort_memory.py /work/ckpt/scale/a/graphs/decode.onnx

Takes a built `decode.onnx` (one file, as `build` writes a graph under the external-data threshold)
and measures, each variant in a fresh process: the resident memory a session adds once made, the
peak while it is made (VmHWM), and the median of 4 decode steps (past length 300, random inputs;
the logits must agree across variants). Variants:

    inline             the graph as built (one protobuf file)
    external-4096      the same tensors in a .data file at 4096-aligned offsets (what ONNX Runtime
                       needs to memory-map external data on Linux)
    + no-prepack       session.disable_prepacking = 1

-> benchmarks/ort_memory.md (ratios against `inline`, measured side by side in one run).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

VARIANTS = [("inline", []), ("external-4096", []), ("inline", ["session.disable_prepacking=1"]),
            ("external-4096", ["session.disable_prepacking=1"])]


def write_aligned(src: Path, out: Path, align: int = 4096) -> None:
    """`src`'s initializers of >= 1 KiB moved to `out`.data, each at an `align`-byte offset."""
    import onnx
    from onnx.external_data_helper import _get_initializer_tensors

    from quota_export.lower.external import _point

    m = onnx.load(str(src))
    with open(f"{out}.data", "wb") as f:
        for t in _get_initializer_tensors(m):
            if t.HasField("raw_data") and len(t.raw_data) >= 1024:
                f.write(b"\0" * (-f.tell() % align))
                off = f.tell()
                f.write(t.raw_data)
                _point(t, f"{out.name}.data", off, len(t.raw_data))
                t.ClearField("raw_data")
    onnx.save_model(m, str(out))


def status() -> dict:
    from quota_export.memtrace import status as st

    return {k: v / 2**30 for k, v in st().items()}


def measure(path: str, opts: list[str]) -> dict:
    """One session on `path` (this process): memory and decode-step seconds."""
    import time

    import numpy as np
    import onnxruntime as ort

    from quota_export.runtime.ort import SESSION_CONFIG

    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in [*SESSION_CONFIG.items(), *(o.split("=") for o in opts)]:
        so.add_session_config_entry(k, v)
    s0 = status()
    t0 = time.monotonic()
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    made = time.monotonic() - t0
    s1 = status()
    rng = np.random.default_rng(0)
    types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(uint8)": np.uint8,
             "tensor(int8)": np.int8, "tensor(double)": np.float64}
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else (300 if i.name.startswith("past.") else 1) for d in i.shape]
        dt = types[i.type]
        feeds[i.name] = (rng.standard_normal(shape) * 0.1).astype(dt) if dt == np.float32 else np.zeros(shape, dt)
    if "position_ids" in feeds:
        feeds["position_ids"][:] = 300
    steps = []
    for _ in range(4):
        t = time.monotonic()
        out = sess.run(None, feeds)
        steps.append(time.monotonic() - t)
    return {"session_s": made, "added_gib": s1["VmRSS"] - s0["VmRSS"], "anon_gib": s1["RssAnon"] - s0["RssAnon"],
            "peak_gib": s1["VmHWM"] - s0["VmRSS"], "step_s": sorted(steps)[len(steps) // 2],
            "logits_sha": __import__("hashlib").sha256(out[0].tobytes()).hexdigest()[:16]}


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args and args[0] == "--child":
        print(json.dumps(measure(args[1], args[2:])))
        return 0
    src = Path(args[0])
    rows = []
    with tempfile.TemporaryDirectory(prefix="ort-memory-") as d:
        ext = Path(d) / "decode.onnx"
        write_aligned(src, ext)
        paths = {"inline": str(src), "external-4096": str(ext)}
        for name, opts in VARIANTS:
            r = subprocess.run([sys.executable, __file__, "--child", paths[name], *opts], capture_output=True,
                               text=True, check=True)
            rows.append((name, opts, json.loads(r.stdout.strip().splitlines()[-1])))
    base = rows[0][2]
    size = src.stat().st_size / 2**30
    out = ["# ONNX Runtime's memory for one decoder session (benchmarks/ort_memory.py)", "",
           f"`{src}` ({size:.2f} GiB, one file), onnxruntime {__import__('onnxruntime').__version__}, "
           "each variant a fresh process; added = resident memory the made session adds, peak = the "
           "highest resident memory while it was made, over the process before it; decode step: median of 4.",
           "", "| variant | session options | made in | added | of which anonymous | peak | decode step | vs inline | logits |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, opts, r in rows:
        out.append(f"| {name} | {' '.join(opts) or '-'} | {r['session_s']:.1f} s | {r['added_gib']:.2f} GiB "
                   f"({r['added_gib'] / size:.2f}x the file) | {r['anon_gib']:.2f} GiB | {r['peak_gib']:.2f} GiB "
                   f"({r['peak_gib'] / size:.2f}x) | {r['step_s']:.3f} s | {r['step_s'] / base['step_s']:.2f}x | "
                   f"{'same' if r['logits_sha'] == base['logits_sha'] else 'DIFFERENT'} |")
    (HERE / "ort_memory.md").write_text("\n".join(out) + "\n")
    print(HERE / "ort_memory.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
