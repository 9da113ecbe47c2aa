"""Real-size VLMs on this machine: build, verify, run of random-weight checkpoints -> benchmarks/scale.md.

    flock /tmp/quota-heavy.lock python benchmarks/scale.py --checkpoint a   # write /work/ckpt/tinyllava-bf16
    flock /tmp/quota-heavy.lock python benchmarks/scale.py --only a         # measure row (a) -> scale-a.json
    python benchmarks/scale.py --table                                      # scale-*.json -> scale.md

Rows (issue #21), random weights of the real geometries, written by this script in bf16 (as the
real checkpoints ship) with a fixed seed, the shapes tokenizer and chat template, and the image
processor at the real size (calib_data/shapes/checkpoints.py; nothing is downloaded):

    a  TinyLLaVA geometry: LLaVA layout, CLIP ViT-L/14-336 (hidden 1024, 24 layers, 16 heads,
       intermediate 4096; 336 px -> 576 visual tokens) + Llama 1.1B (hidden 2048, 22 layers,
       32 heads, 4 KV heads, intermediate 5632, vocab 32000)
    b  Qwen2-VL-2B at 448x448 (vision depth 32, embed 1280, 16 heads; text hidden 1536, 28 layers,
       12 heads, 2 KV heads, intermediate 8960, vocab 151936, mrope_section [16, 24, 24]; lm_head
       untied) -> 256 visual tokens
    c  LLaVA-1.5-7B: CLIP-L/14-336 + Llama hidden 4096, 32 layers, 32 heads, intermediate 11008,
       vocab 32064

Checkpoints go to $QUOTA_CKPT (default /work/ckpt)/<name>, written to a temporary folder and
renamed when complete. Each measured step (`build`, `verify`, `run`) runs as a child process
under a memory limit (`--mem-limit`, default 22 GiB: a psutil watchdog kills the child's process
tree above it, so a step that does not fit fails cleanly); peak RSS is psutil's sampling of the
child's tree (every 0.2 s). Heavy: run each row alone, under the lock.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

CKPT = Path(os.environ.get("QUOTA_CKPT", "/work/ckpt"))
SEED = 0
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, layer_norm_eps=1e-5)
ROWS = {
    "a": dict(name="tinyllava-bf16", label="TinyLLaVA geometry (CLIP-L/14-336 + Llama 1.1B)", family="llava",
              stages=((2, 256), (6, 144), (12, 72)),
              vision=CLIP_L_336,
              text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)),
    "b": dict(name="qwen2vl2b-448-bf16", label="Qwen2-VL-2B geometry at 448x448", family="qwen2_vl", image=448,
              stages=((2, 114), (6, 64), (12, 32)),
              vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14),
              text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                        rms_norm_eps=1e-6,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [16, 24, 24]})),
    "c": dict(name="llava15-7b-bf16", label="LLaVA-1.5-7B geometry", family="llava", vision=CLIP_L_336,
              stages=((2, 256), (6, 144), (12, 72)),
              text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)),
}


def write_checkpoint(row: str) -> Path:
    """The row's checkpoint folder, written (bf16, seed SEED) unless it is already there."""
    import torch

    from calib_data.shapes.checkpoints import llava_config, qwen2_vl_config, qwen_tokenizer, write_llava, write_qwen2_vl
    from calib_data.shapes.model import build_tokenizer

    spec = ROWS[row]
    out = CKPT / spec["name"]
    if (out / "config.json").is_file():
        return out
    CKPT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec['name']}.", dir=CKPT))
    if spec["family"] == "llava":
        tok = build_tokenizer()
        tok.model_max_length = 4096  # prompts of 576 visual tokens + text
        write_llava(tmp, llava_config(tok, spec["vision"], spec["text"]), SEED, tok, dtype=torch.bfloat16, resize=True)
    else:
        tok, vocab = qwen_tokenizer()
        tok.model_max_length = 4096
        cfg = qwen2_vl_config(vocab, spec["text"], spec["vision"])
        write_qwen2_vl(tmp, cfg, SEED, tok, spec["image"], dtype=torch.bfloat16, resize=True)
    for f in tmp.iterdir():
        f.chmod(0o644)
    tmp.chmod(0o755)
    tmp.rename(out)
    return out


def work_dir(row: str) -> Path:
    return CKPT / "scale" / row


def write_inputs(row: str, samples: int) -> tuple[Path, Path]:
    """(recipe, bench JSONL) of a row, under work_dir(row): W4A4KV4 RTN, the row's pruning
    schedule; the first `samples` of the shipped test split (Qwen2-VL: resized to its one
    declared size, bicubic; LLaVA's processor resizes them itself)."""
    import json

    import yaml

    spec = ROWS[row]
    d = work_dir(row)
    d.mkdir(parents=True, exist_ok=True)
    lines = [json.loads(x) for x in (ROOT / "calib_data/shapes/test.jsonl").read_text().splitlines()[:samples]]
    if spec["family"] == "qwen2_vl":
        from PIL import Image

        (d / "images").mkdir(exist_ok=True)
        side = spec["image"]
        for rec in lines:
            src = ROOT / "calib_data/shapes" / rec["image"]
            rec["image"] = f"images/{Path(rec['image']).name}"
            Image.open(src).convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(d / rec["image"])
    else:
        for rec in lines:
            rec["image"] = str(ROOT / "calib_data/shapes" / rec["image"])
    bench = d / "bench.jsonl"
    bench.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
    n = (spec["vision"]["image_size"] // spec["vision"]["patch_size"]) ** 2 if spec["family"] == "llava" else \
        (spec["image"] // (spec["vision"]["patch_size"] * 2)) ** 2
    quant = {"scheme": "w4a4kv4"}
    if spec["family"] == "qwen2_vl":
        quant["weights"] = {"bits": 4, "ignore": ["lm_head", r"^model\.visual\."]}
    kept = sum(k * (nxt - layer) for (layer, k), nxt in
               zip(spec["stages"], [s[0] for s in spec["stages"][1:]] + [spec["text"]["num_hidden_layers"]]))
    budget = round((kept + n * spec["stages"][0][0]) / (n * spec["text"]["num_hidden_layers"]) + 0.01, 3)
    doc = {"name": f"scale-{row}", "model": str(CKPT / spec["name"]), "quant": quant,
           "pruning": {"budget": budget, "n_visual": n, "stages": [{"layer": l, "keep": k} for l, k in spec["stages"]]},
           "export": {"max_seq": 1024}}
    recipe = d / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    return recipe, bench


def run_timing(artifacts: str, bench: str, out: str) -> None:
    """The child of the `run` column: the runner `run` uses (sessions made on use, one graph at a
    time: graphmajor.generate_all) on the first bench sample, each graph call and each session's
    making timed apart; -> JSON at `out`."""
    import json
    import statistics

    from quota_export.data import load_bench, load_image
    from quota_export.runtime.graphmajor import generate_all
    from quota_export.runtime.ort import read_manifest
    from quota_export.runtime.runners import GraphRunner, parity_session_bytes

    t0 = time.monotonic()
    r = GraphRunner(artifacts, session_bytes=parity_session_bytes(read_manifest(Path(artifacts))))
    load = time.monotonic() - t0
    calls: dict[str, list[float]] = {}
    made = [0.0]  # seconds making sessions (inside the first call of each graph)
    real, real_session = r._run, r._session

    def session(g, src, so):
        t = time.monotonic()
        res = real_session(g, src, so)
        made[0] += time.monotonic() - t
        return res

    def timed(g, feeds):
        t, before = time.monotonic(), made[0]
        res = real(g, feeds)
        calls.setdefault(g, []).append(time.monotonic() - t - (made[0] - before))
        return res

    r._run, r._session = timed, session
    s = load_bench(bench, limit=1)[0]
    t1 = time.monotonic()
    res = generate_all(r, [(load_image(s), s.question)], max_new_tokens=8)[0]
    gen = time.monotonic() - t1 - made[0]
    dec = calls.get("decode.onnx", [])
    Path(out).write_text(json.dumps({
        "load_s": round(load + made[0], 1), "generate_s": round(gen, 1), "tokens": len(res.tokens),
        "vision_s": round(sum(calls.get("vision.onnx", [0])), 2), "prefill_s": round(sum(calls.get("prefill.onnx", [0])), 2),
        "decode_s_per_token": round(statistics.median(dec), 3) if dec else None, "cache_bytes": res.cache_bytes,
        "sessions": "one graph at a time",
    }))


def measure_row(row: str, limit: int, samples: int, calibrate: bool, skip: tuple = ()) -> dict:
    import datetime
    import json

    spec = ROWS[row]
    d = work_dir(row)
    res = {"row": row, "label": spec["label"], "checkpoint": spec["name"],
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip(),
           "mem_limit_gib": limit / 2**30, "samples": samples}
    ck = measured([sys.executable, __file__, "--write-checkpoint", row], limit)
    if ck["rc"]:
        res["error"] = f"checkpoint: {ck}"
        return res
    res["checkpoint_bytes"] = sum(f.stat().st_size for f in (CKPT / spec["name"]).glob("*.safetensors"))
    recipe, bench = write_inputs(row, samples)
    out = d / "graphs"
    shutil.rmtree(out, ignore_errors=True)  # scale.py's own output of an earlier run
    for f in ("verify.json", "run.json"):
        (d / f).unlink(missing_ok=True)
    py = [sys.executable, "-m", "quota_export"]
    steps = {
        "build": py + ["build", "--recipe", str(recipe), "--out", str(out), "--bench", str(bench), "--samples", str(samples)],
        "verify": py + ["verify", "--artifacts", str(out), "--bench", str(bench), "--samples", str(samples),
                        "--json", str(d / "verify.json")],
        "run": [sys.executable, __file__, "--run-timing", str(out), str(bench), str(d / "run.json")],
    }
    if calibrate:
        steps["calibrate"] = py + ["calibrate", "--model", str(CKPT / spec["name"]), "--data", str(bench),
                                   "--budget", "0.3", "--samples", str(samples), "-o", str(d / "calibrated.yaml")]
    for name, cmd in steps.items():
        if name in skip:
            continue
        r = measured(cmd, limit, d / f"{name}.log")
        tail = (d / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
        res[name] = {**r, **({"log_tail": tail} if r["rc"] else {})}
        print(f"{row} {name}: {r}", flush=True)
        if r["rc"] and name == "build":
            break
    if res["build"]["rc"] == 0:
        man = json.loads((out / "manifest.json").read_text())
        res["parity"] = {k: man["parity"].get(k) for k in (
            "kept_index_agreement_per_stage", "answer_agreement", "logits_sqnr_db_min", "logits_sqnr_db_median")}
        res["graphs"] = {g: {"bytes": e["bytes"], "data_bytes": man["files"].get(e["external_data"], {}).get("bytes")
                             if e.get("external_data") else None} for g, e in man["graphs"].items()}
    for name, f in (("verify_report", "verify.json"), ("run_timing", "run.json")):
        if (d / f).is_file():
            res[name] = json.loads((d / f).read_text())
    return res


def _gib(b) -> str:
    return f"{b / 2**30:.2f}"


def _step(r: dict | None) -> str:
    if not r:
        return "not run"
    if r.get("killed"):
        return f"**killed above the limit** after {r['seconds']:.0f} s (peak {_gib(r['peak_rss'])} GiB)"
    if r["rc"]:
        return f"**failed** (exit {r['rc']}) after {r['seconds']:.0f} s, peak {_gib(r['peak_rss'])} GiB"
    return f"{r['seconds']:.0f} s, peak {_gib(r['peak_rss'])} GiB"


def table() -> str:
    import json

    rows = [json.loads((HERE / f"scale-{r}.json").read_text()) for r in sorted(ROWS) if (HERE / f"scale-{r}.json").is_file()]
    out = [
        "# Real-size VLMs on this machine (benchmarks/scale.py)",
        "",
        "Random-weight bf16 checkpoints of real geometries (written by the script; see its docstring),",
        "W4A4KV4 RTN with a 3-stage pruning schedule, parity on the first samples of the shipped test",
        "split. Peak RSS: the step's process tree, sampled every 0.2 s (the checkpoint's safetensors",
        "are memory-mapped: pages read count in RSS). Goal (issue #21): peak <= checkpoint + 4 GiB.",
        "Each row is one `python benchmarks/scale.py --only <row>` on this machine (2 cores, 24 GiB, shared).",
        "",
        "| row | checkpoint | goal (ckpt + 4 GiB) | build | verify | run (one answer, 8 tokens) | calibrate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ck = r.get("checkpoint_bytes")
        goal = f"{_gib(ck + 4 * 2**30)} GiB" if ck else "-"
        rt = r.get("run_timing")
        run = _step(r.get("run"))
        if rt:
            run += (f"; {rt.get('sessions', 'all four sessions held')}; sessions made in {rt['load_s']} s, "
                    f"vision {rt['vision_s']} s, prefill {rt['prefill_s']} s, "
                    f"**decode {rt['decode_s_per_token']} s/token** ({rt['tokens']} tokens)")
        cal = _step(r["calibrate"]) if r.get("calibrate") else \
            "not run here (`--calibrate`); the TinyLLaVA geometry's 32-sample run: docs/calibration.md, Cost"
        out.append(f"| ({r['row']}) {r['label']} | {_gib(ck) if ck else '-'} GiB | {goal} | {_step(r.get('build'))} | "
                   f"{_step(r.get('verify'))} | {run} | {cal} |")
    out += ["", "## Graphs and parity", "",
            "| row | vision | embed | prefill | decode | parity: kept / answers / min dB (median) | verify |",
            "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r.get("graphs") or {}

        def mb(name):
            e = g.get(name)
            if not e:
                return "-"
            return f"{e['bytes'] / 1e6:.0f} MB" + (f" + {e['data_bytes'] / 1e6:.0f} MB data" if e.get("data_bytes") else "")

        p = r.get("parity")
        par = "-" if not p else (f"{p['kept_index_agreement_per_stage']} / {p['answer_agreement']} / "
                                 f"{p['logits_sqnr_db_min']} ({p['logits_sqnr_db_median']}) on {r['samples']} samples")
        v = r.get("verify_report")
        ver = "-" if not v else (f"{v.get('kept_index_agreement_per_stage')} / {v.get('answer_agreement')} / "
                                 f"{v.get('logits_sqnr_db_min')}")
        out.append(f"| ({r['row']}) | {mb('vision.onnx')} | {mb('embed.onnx')} | {mb('prefill.onnx')} | "
                   f"{mb('decode.onnx')} | {par} | {ver} |")
    out += ["", "Measured: " + "; ".join(f"({r['row']}) {r['date']} at {r['commit']}" for r in rows), ""]
    for r in rows:
        if r.get("error"):
            out.append(f"- ({r['row']}): {r['error']}")
        for step in ("build", "verify", "run", "calibrate"):
            st = r.get(step) or {}
            if st.get("rc") and st.get("log_tail"):
                out.append(f"- ({r['row']}) {step}: `{st['log_tail'][-1][:300]}`")
    return "\n".join(out) + "\n"


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (/proc; Linux)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


def measured(cmd: list[str], limit: int, log: Path | None = None) -> dict:
    """Run `cmd` (its own process group), sampling its tree's RSS every 0.2 s; above `limit` bytes
    the group is killed. -> {rc, seconds, peak_rss, killed}."""
    out = open(log, "w") if log else subprocess.DEVNULL
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    peak, killed = 0, False
    while p.poll() is None:
        rss = tree_rss(p.pid)
        peak = max(peak, rss)
        if rss > limit and not killed:
            killed = True
            os.killpg(p.pid, signal.SIGKILL)
        time.sleep(0.2)
    if log:
        out.close()
    return {"rc": p.returncode, "seconds": round(time.monotonic() - t0, 1), "peak_rss": peak, "killed": killed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", choices=sorted(ROWS), action="append", default=[],
                    help="write the row's checkpoint (if missing; a child process under --mem-limit) and stop")
    ap.add_argument("--mem-limit", type=float, default=22.0, help="GiB; a child above it is killed (default 22)")
    ap.add_argument("--only", choices=sorted(ROWS), action="append", default=[],
                    help="measure this row -> benchmarks/scale-<row>.json, then rewrite scale.md")
    ap.add_argument("--samples", type=int, default=2, help="parity samples (build and verify; default 2)")
    ap.add_argument("--calibrate", action="store_true", help="also time `calibrate` on the row (its own column)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["verify", "run"], help="steps not measured")
    ap.add_argument("--table", action="store_true", help="rewrite benchmarks/scale.md from the rows' JSON")
    ap.add_argument("--write-checkpoint", choices=sorted(ROWS), help=argparse.SUPPRESS)  # children's parts
    ap.add_argument("--run-timing", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    limit = int(args.mem_limit * 2**30)
    if args.write_checkpoint:
        print(write_checkpoint(args.write_checkpoint))
        return 0
    if args.run_timing:
        run_timing(*args.run_timing)
        return 0
    for row in args.only:
        import json

        res = measure_row(row, limit, args.samples, args.calibrate, tuple(args.skip))
        (HERE / f"scale-{row}.json").write_text(json.dumps(res, indent=1) + "\n")
    if args.only or args.table:
        (HERE / "scale.md").write_text(table())
        print(HERE / "scale.md")
    for row in args.checkpoint:
        r = measured([sys.executable, __file__, "--write-checkpoint", row], limit)
        print(f"{row}: {CKPT / ROWS[row]['name']}: {r}")
        if r["rc"]:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
