"""Bounded load test of `python -m quota_export serve` (PyTriton, 127.0.0.1) -> benchmarks/serving.md.

    flock /tmp/quota-heavy.lock python benchmarks/serving.py [--artifacts DIR] [--clients 4] [--requests 8]

N concurrent clients x M requests (distinct samples of the shipped test split; half the clients
over HTTP, half over gRPC, through tritonclient) for 1, 2 and 4 instances, each a fresh server.
Every answer is compared with `run`'s for the same sample (OrtRunner.generate, computed here in
process first); every request id must be answered exactly once (none lost, none duplicated).
Throughput is requests / wall time of the loaded phase; latencies are per request, client side.

Restart scenario (2 instances): the server's process group gets SIGKILL once a third of the
requests are answered, a new server starts on the same ports; clients retry a request that failed
(connection refused / reset, server unavailable: no `error:` line from the model) every 1 s for up
to 3 min; a request the model refused is not retried.

Bounded: at most clients x requests requests per phase, a 600 s deadline per phase, localhost only.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEST_SPLIT = ROOT / "calib_data" / "shapes" / "test.jsonl"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, help="a build (default: build recipes/default.yaml into a temp dir)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8, help="per client")
    ap.add_argument("--instances", default="1,2,4")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "serving.md"), help="markdown output ('-': stdout)")
    a = ap.parse_args()
    if not 1 <= a.clients * a.requests <= 400:
        raise SystemExit("--clients x --requests: keep it between 1 and 400 (a bounded load)")
    from quota_export.data import load_bench, load_image
    from quota_export.runtime.ort import OrtRunner
    from quota_export.serve.local import PHASE_DEADLINE_S, RETRY_PAUSE_S, RETRY_WINDOW_S, LocalServer, kill_and_restart, load, verdict

    started = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="serving-bench-")
    artifacts = a.artifacts
    if artifacts is None:
        artifacts = Path(tmp.name) / "default"
        subprocess.run([sys.executable, "-m", "quota_export", "build", "--recipe", str(ROOT / "recipes" / "default.yaml"),
                        "--out", str(artifacts), "--samples", "2"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    n = a.clients * a.requests
    samples = load_bench(TEST_SPLIT, limit=n)
    runner = OrtRunner(artifacts)
    reference = []
    for s in samples:
        r = runner.generate(load_image(s), s.question)
        reference.append((r.text, r.tokens))
    del runner
    print(f"reference answers of `run` for {n} samples: {len({t for t, _ in reference})} distinct", flush=True)
    log = Path(tmp.name) / "serve.log"
    rows = []
    for inst in [int(x) for x in a.instances.split(",")]:
        srv = LocalServer(artifacts, inst, log)
        ready = srv.start(PHASE_DEADLINE_S)
        load(srv.ports, samples, inst, 1)  # warm-up: one request per instance, not counted
        v = verdict(load(srv.ports, samples, a.clients, a.requests), reference)
        rc = srv.terminate()
        v.update(instances=inst, ready=ready, rc=rc)
        rows.append(v)
        print(f"{inst} instance(s): {v['rps']:.2f} req/s, p50 {v['p50']:.0f} ms, p99 {v['p99']:.0f} ms, "
              f"lost {v['lost']}, wrong {v['wrong']}, dup {v['dup']}, exit {rc}", flush=True)

    # restart scenario
    srv = LocalServer(artifacts, 2, log)
    srv.start(PHASE_DEADLINE_S)
    kv, killed, in_flight = kill_and_restart(srv, samples, a.clients, a.requests, reference, after=n // 3)
    rc = srv.terminate()
    print(f"kill + restart: killed after {killed.get('at')} answers, retried {kv['retried']} ({in_flight} in flight "
          f"at the kill), lost {kv['lost']}, wrong {kv['wrong']}, dup {kv['dup']}, failures {kv['failures']}", flush=True)
    total = time.monotonic() - started

    import numpy
    import onnxruntime

    try:
        import importlib.metadata as md
        pyt = md.version("nvidia-pytriton")
        tc = md.version("tritonclient")
    except Exception:  # noqa: BLE001
        pyt = tc = "?"
    base = rows[0]["rps"]
    lines = [
        "# Serving: bounded load test of `serve` (PyTriton, 127.0.0.1)", "",
        f"Command: `flock /tmp/quota-heavy.lock python benchmarks/serving.py --clients {a.clients} --requests {a.requests}` "
        f"(script: benchmarks/serving.py). Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
        f"Run time {total / 60:.1f} min.", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, Python "
        f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}, "
        f"nvidia-pytriton {pyt} (Triton 2.51 server, CPU only), tritonclient {tc}. Load average "
        f"{os.getloadavg()[0]:.2f} at the end: the machine is shared, read the ratios, not the absolute times.", "",
        f"Model: the shipped shapes-llava built with recipes/default.yaml (W4A4KV4, QUOTA budget 0.3 with merging). "
        f"Load: {a.clients} concurrent clients x {a.requests} requests = {n} distinct samples of the test split "
        f"(clients 0, 2, ... over HTTP, 1, 3, ... over gRPC, tritonclient), one request at a time per client; one "
        f"warm-up request per instance before each measurement. Every answer is compared with `run`'s "
        f"(OrtRunner.generate) on the same sample: text and token ids.", "",
        "The graphs take batch 1, so Triton's dynamic batcher is off; instances are separate ONNX Runtime sessions "
        "with the 2 cores shared out (intra-op threads = cores // instances, at least 1).", "",
        "| instances | requests | answered | lost | wrong | duplicated | req/s | vs 1 instance | p50 ms | p99 ms | server ready s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in rows:
        lines.append(f"| {v['instances']} | {v['n']} | {v['answered']} | {v['lost']} | {v['wrong']} | {v['dup']} | "
                     f"{v['rps']:.2f} | {v['rps'] / base:.2f} | {v['p50']:.0f} | {v['p99']:.0f} | {v['ready']:.1f} |")
    lines += ["", "## Server killed mid-run and restarted", "",
              f"2 instances, the same {n} requests. After {killed.get('at')} answers the server's process group got "
              f"SIGKILL (tritonserver, the stubs and the Python process with the sessions); a new server started on "
              f"the same ports (ready after {killed.get('down', float('nan')):.1f} s). A client whose request failed "
              f"(connection refused or reset, server unavailable) retried it every {RETRY_PAUSE_S:.0f} s for up to {RETRY_WINDOW_S} s.", "",
              "| requests | answered | lost | wrong | duplicated | retried | of which in flight at the kill | sent while down |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| {kv['n']} | {kv['answered']} | {kv['lost']} | {kv['wrong']} | {kv['dup']} | {kv['retried']} | "
              f"{in_flight} | {kv['retried'] - in_flight} |", "",
              "Only requests in flight at the kill (or sent before the new server was ready) failed; each was retried "
              "and answered once, correctly. A killed server leaves PyTriton's workspace (~/.cache/pytriton/workspace_*) "
              "and its shared-memory blocks (/dev/shm/pytrtion<pid>-*) behind; a graceful stop (SIGTERM) removes them, "
              "and the script removes what its killed server left (quota_export/serve/local.py) but for a 4 KB "
              "/dev/shm/psm_* block of Python's multiprocessing, which it cannot tell from other processes' blocks.", ""]
    bad = [v for v in rows + [kv] if v["lost"] or v["wrong"] or v["dup"] or v["failures"]]
    lines.append("Result: " + ("0 lost, 0 wrong, 0 duplicated answers in every phase."
                               if not bad else f"FAILURES: {[v['failures'] for v in bad]}"))
    lines.append("")
    text = "\n".join(lines)
    if a.out == "-":
        print(text)
    else:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")
    tmp.cleanup()
    return 1 if bad or any(v["rc"] for v in rows) or rc else 0


if __name__ == "__main__":
    sys.exit(main())
