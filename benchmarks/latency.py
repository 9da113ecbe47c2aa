"""What pruning + low-bit buy on ONNX Runtime CPU, measured side by side -> benchmarks/latency.md.

    python benchmarks/latency.py                 # the full run (~5-20 min), rewrites benchmarks/latency.md
    python benchmarks/latency.py --small --out - # a quick smoke configuration, table on stdout

One random-weight decoder of the LLaVA architecture (default: hidden 1024, 8 layers, intermediate
2816, 16 heads, MHA), fed random embeddings in the LLaVA-1.5 token layout

    [24 text tokens | 576 visual tokens | 16 text tokens]   T = 616, visual_start = 24

and lowered by `quota_export.lower.decoder.DecoderLowering` (prefill + decode graphs only; the
vision tower plays no part, and no parity is checked here) into these variants:

    fp32            FP32 weights, activations and cache, fp32 reductions; all tokens (the plain
                    FP32 model, as before the exact-parity numerics)
    ort-int4@4      the fp32 graphs through onnxruntime's MatMulNBitsQuantizer (4-bit weights,
                    block 32, symmetric, accuracy_level 4, lm_head excluded; fp32 activations and
                    cache): the peer
    w4a4kv4@L       W4A4KV4 as `build` lowers it (exact quantized matmuls, `export.reductions:
                    fp64`, the default); all tokens
    quota@L         w4a4kv4 + the pruning schedule (stages at layers 1, 2, 4; mean kept <= 30%)
    w4a4kv4-r32@1   w4a4kv4 with `export.reductions: fp32` (Deployed.with_reductions(False) before
    quota-r32@1     lowering): RMSNorm statistics, RoPE tables, attention, SiLU and the pruning
                    signals in fp32 instead of float64; same weights, same KV cache format
    w4a4kv4-int     w4a4kv4 / quota with `export.matmul: integer` (MatMulInteger over uint8 activation
    quota-int       codes and int8 weight planes, lower/intlinear.py): the same weights and the same
                    bits as the float form
    w4a4kv4-intch   the same with per-output-channel weight scales (one GEMM per linear; other weights
    quota-intch     than the group-32 rows, so compare them with fp32 and the peer only)

@L is the session's `session.qdq_matmulnbits_accuracy_level` for ONNX Runtime's DQ+MatMul ->
MatMulNBits fusion: 1 = fp32 compute, exact, what `OrtRunner` uses; 4 = int8 activations inside the
kernel (ONNX Runtime's default; not bit-exact to reference.py). The goal lines (pruned vs ideal,
decode vs fp32, KV bytes, graph sizes) come from the default (fp64) variants, what `build` ships;
the -r32 variants only price the fp64 reductions (paired fp64 / fp32 ratios).

All sessions run in one process with the same thread count; repeats of the variants are
interleaved (order shuffled per repeat, seeded) and the tables give medians and ratios, the
ratios as the median of per-repeat paired ratios. Profiled runs of `w4a4kv4` and `quota` (float,
integer and per-channel integer forms, and the -r32 counterparts) split the prefill time by node
category (ONNX Runtime's profiler), to show where the gap to the ideal ratio, and the cost of the
fp64 reductions, come from; profiled decode steps of fp32, the peer and the QUOTA graphs split a
decode step the same way. A goals table sets the exact variants against the speed goals.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPSET = 21
# variant -> (graph folder, the session's MatMulNBits accuracy level; None: no QDQ fusion involved)
VARIANTS = {
    "fp32": ("fp32", None),
    "ort-int4@4": ("ort-int4", None),
    "w4a4kv4@1": ("w4a4kv4", 1),
    "quota@1": ("quota", 1),
    "w4a4kv4@4": ("w4a4kv4", 4),
    "quota@4": ("quota", 4),
    "w4a4kv4-r32@1": ("w4a4kv4-r32", 1),
    "quota-r32@1": ("quota-r32", 1),
    "w4a4kv4-int": ("w4a4kv4-int", None),
    "quota-int": ("quota-int", None),
    "w4a4kv4-intch": ("w4a4kv4-intch", None),
    "quota-intch": ("quota-intch", None),
}
INT_ROWS = (("w4a4kv4-int", "w4a4kv4@1"), ("quota-int", "quota@1"), ("w4a4kv4-intch", None), ("quota-intch", None))
PAIRS = (("w4a4kv4@1", "quota@1"), ("w4a4kv4@4", "quota@4"), ("w4a4kv4-int", "quota-int"),
         ("w4a4kv4-intch", "quota-intch"))  # (unpruned, pruned) at the same precision
R32_PAIRS = (("w4a4kv4@1", "w4a4kv4-r32@1"), ("quota@1", "quota-r32@1"))  # (fp64 reductions, fp32 reductions)
PROFILED = tuple(dict.fromkeys(v for pair in PAIRS + R32_PAIRS for v in pair))
DECODE_PROFILED = ("fp32", "ort-int4@4", "quota@1", "quota-int", "quota-intch")  # the decode-step split
PEER_LEVEL = 4
TEXT_BEFORE, TEXT_AFTER = 24, 16  # LLaVA-1.5: system prompt + "USER:" before the image, question after


# ---------------------------------------------------------------- model, schedule, recipes
def make_adapter(hidden: int, layers: int, heads: int, inter: int, vocab: int, image: int, patch: int, seed: int):
    """A random LlavaForConditionalGeneration (tiny vision tower) wrapped in the project's adapter."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from quota_export.models.llava import LlavaAdapter

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image, patch_size=patch, projection_dim=32)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1,
                      image_seq_length=(image // patch) ** 2, vision_feature_select_strategy="default",
                      vision_feature_layer=-1, tie_word_embeddings=False)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    with torch.no_grad():
        model = LlavaForConditionalGeneration(cfg).eval()
    return LlavaAdapter(model, None, Path("random-llava"))


def schedule(n_visual: int, num_layers: int, stage_layers: list[int], budget: float) -> list[int]:
    """keep_i = floor(n * r^(i+1)) with the largest r (step 0.001) whose mean kept <= budget * n."""
    from quota_export.recipe import Pruning, Stage

    for r in np.arange(0.999, 0.0, -0.001):
        keeps = [max(1, int(n_visual * r ** (i + 1))) for i in range(len(stage_layers))]
        p = Pruning(budget=1.0, n_visual=n_visual, stages=[Stage(layer=l, keep=k) for l, k in zip(stage_layers, keeps)])
        if sum(p.kept_per_layer(num_layers)) <= budget * n_visual * num_layers + 1e-9:
            return keeps
    raise ValueError("no schedule meets the budget")


def make_recipe(name: str, scheme: str, n_visual: int, stages: list[tuple[int, int]], budget: float,
                matmul: str = "float", channel: bool = False):
    from quota_export.recipe import SCHEMES, Export, Pruning, Quant, Recipe, ScoreWeights, Stage

    st = [Stage(layer=l, keep=k, weights=ScoreWeights(magnitude=0.5, attention=1.0, risk=0.5)) for l, k in stages]
    w = SCHEMES[scheme].weights.model_copy(update={"granularity": "channel"}) if channel else None
    return Recipe(name=name, model="random-llava", quant=Quant(scheme=scheme, weights=w),
                  pruning=Pruning(budget=float(budget), n_visual=n_visual, stages=st), export=Export(matmul=matmul))


# ---------------------------------------------------------------- graphs
def lower_variant(adapter, recipe, n_visual: int, visual_start: int, fp64: bool = True):
    """Recipe -> (prefill, decode) ModelProtos via DecoderLowering (target onnx, as `build` does).
    fp64=False: lowered from the Deployed with fp32 reductions (`with_reductions(False)`)."""
    from quota_export.lower.decoder import DecoderLowering
    from quota_export.reference import DeployConfig, Deployed

    recipe.check_against(adapter.decoder_spec().num_layers, n_visual, adapter.module_names())
    dep = Deployed(adapter, DeployConfig.from_recipe(recipe)).with_reductions(fp64)
    pre = DecoderLowering(dep, n_visual, visual_start).prefill(OPSET)
    dec = DecoderLowering(dep, n_visual, visual_start).decode(OPSET)
    return pre, dec


def ort_int4(src: Path, dst: Path, accuracy_level: int) -> None:
    """The peer: onnxruntime's own 4-bit weight quantizer on an fp32 graph (lm_head left fp32, as ours)."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    m = onnx.load(str(src))
    skip = [n.name for n in m.graph.node if n.name.startswith("/lm_head/")]
    q = MatMulNBitsQuantizer(m, bits=4, block_size=32, is_symmetric=True, accuracy_level=accuracy_level,
                             nodes_to_exclude=skip)
    q.process()
    q.model.save_model_to_file(str(dst))


def int4_storage(model) -> tuple[int, int]:
    """(bytes the 4-bit initializers take in the serialized graph, bytes they take packed two per byte)."""
    from onnx import TensorProto

    stored = packed = 0
    for t in model.graph.initializer:
        if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
            stored += t.ByteSize()
            packed += (int(np.prod(t.dims)) + 1) // 2
    return stored, packed


def save(model, path: Path) -> int:
    path.write_bytes(model.SerializeToString())
    return path.stat().st_size


def session(path: Path, threads: int, accuracy_level: int | None, profile: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def op_counts(sess_path: Path, threads: int, tmp: Path) -> dict[str, int]:
    """Op types of the graph as ONNX Runtime optimized it (to show whether MatMulNBits fused)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    out = tmp / (sess_path.stem + ".opt.onnx")
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(sess_path), so, providers=["CPUExecutionProvider"])
    m = onnx.load(str(out), load_external_data=False)
    counts: dict[str, int] = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    out.unlink()
    for p in tmp.glob(out.name + "*"):
        p.unlink()
    return counts


# ---------------------------------------------------------------- profile categories
CATEGORIES = (
    "linear layers (MatMul / MatMulNBits, per-token scale)",
    "weight dequantization (fixed per run)",
    "activation quant",
    "attention (QK, mask, softmax, PV)",
    "KV-cache quant",
    "KV-cache read (decode: unpack + dequantize the past)",
    "stage: q/k/v pass over all current tokens",
    "stage: signals (text attention, magnitude, risk)",
    "stage: gather (TopK, Gather)",
    "norms, RoPE, SiLU, residual, lm_head, other",
)
(LINEAR, WDQ, ACTQ, ATTN, KVQ, KVR, S_QKV, S_SIG, S_GATHER, OTHER) = CATEGORIES


def node_categories(model) -> dict[str, str]:
    """Original node name -> category. At a pruning layer, every node before that stage's gather
    is the scoring pass over all current tokens: its q/k/v part (named like the layer's own q/k/v
    nodes) and its signals (under `prune/`)."""
    names = [n.name for n in model.graph.node]
    ops = [n.op_type for n in model.graph.node]
    scoring: set[str] = set()
    gathers = {int(m.group(1)) for n in names if (m := re.match(r"/model/layers\.(\d+)/prune/(gather|inlined)", n))}
    for l in sorted(gathers):
        first = next(i for i, n in enumerate(names) if n.startswith(f"/model/layers.{l}/"))
        gather = next(i for i, n in enumerate(names) if re.match(rf"/model/layers\.{l}/prune/(gather|inlined)", n))
        scoring.update(names[first:gather])
    cat = {}
    for n, op in zip(names, ops):
        if re.search(r"/prune/(gather|inlined)", n):
            c = S_GATHER
        elif "/prune/" in n:
            c = S_SIG
        elif n in scoring:
            c = S_QKV
        elif "input_quant" in n:
            c = ACTQ
        elif "/attn/cache/" in n:
            c = KVR
        elif "cache_quant" in n or "pack4" in n:
            c = KVQ
        elif "/attn/sdpa/" in n or "/repeat_" in n:
            c = ATTN
        elif re.search(r"_proj/", n) and op == "DequantizeLinear":
            c = WDQ
        elif re.search(r"_proj/", n):  # MatMul / MatMulNBits or MatMulInteger, its scales
            c = LINEAR
        else:
            c = OTHER
        cat[n] = c
    return cat


def _split_events(events: list, cats: dict[str, str], keys: list[str], lookup: dict[str, str]) -> list[dict[str, float]]:
    """Profiler events of one session -> per model run, kernel ms per category."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_run = [dict.fromkeys(CATEGORIES, 0.0) for _ in spans]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        r = next((i for i, (t0, t1) in enumerate(spans) if t0 <= e["ts"] <= t1), None)
        if r is None:
            continue
        name = e["name"][: -len("_kernel_time")]
        if name not in lookup:  # fused / duplicated nodes carry the original name as a prefix
            lookup[name] = next((cats[k] for k in keys if name.startswith(k)), OTHER)
            if os.environ.get("LATENCY_DEBUG") and name not in cats:
                print("profile name", name, "->", lookup[name], file=sys.stderr)
        per_run[r][lookup[name]] += e["dur"] / 1000.0
    return per_run


def profile_split(variants: list[str], paths: dict[str, dict[str, Path]], feeds: dict[str, dict], threads: int,
                  tmp: Path, rounds: int, seed: int, graph: str = "prefill") -> dict[str, dict[str, float]]:
    """Per variant, kernel ms of each category in `graph` (prefill or decode; `feeds[v]` its inputs): the
    median over `rounds` profiled runs after one warm-up, the variants' runs interleaved (order shuffled
    per round) like the timed ones."""
    import onnx
    from tqdm import tqdm

    sess = {}
    for v in variants:
        folder, level = VARIANTS[v]
        sess[v] = session(paths[folder][graph], threads, level, profile=str(tmp / f"prof_{graph}_{v.replace('@', '_')}"))
    for v, s in sess.items():
        s.run(None, feeds[v])
    order = list(sess)
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(rounds), desc=f"profile {graph} (interleaved)", unit="round"):
        rng.shuffle(order)
        for v in order:
            sess[v].run(None, feeds[v])
    out = {}
    for v, s in sess.items():
        prof = Path(s.end_profiling())
        events = json.loads(prof.read_text())
        prof.unlink()
        cats = node_categories(onnx.load(str(paths[VARIANTS[v][0]][graph]), load_external_data=False))
        keys = sorted(cats, key=len, reverse=True)
        per_run = _split_events(events, cats, keys, {})[1:]  # drop the warm-up
        out[v] = {c: med([pr[c] for pr in per_run]) for c in CATEGORIES}
    return out


# ---------------------------------------------------------------- timing
@dataclass
class Timed:
    prefill: dict[str, list[float]] = field(default_factory=dict)
    decode: dict[str, list[float]] = field(default_factory=dict)


def med(xs):
    return statistics.median(xs)


def paired(a: list[float], b: list[float]) -> float:
    """median over repeats of a[r] / b[r]"""
    return med([x / y for x, y in zip(a, b)])


def kv_bytes(outputs: dict[str, np.ndarray]) -> dict[str, int]:
    d = {"q": 0, "scale": 0, "zero": 0}
    for k, v in outputs.items():
        if not k.startswith("present."):
            continue
        d["scale" if k.endswith("_scale") else "zero" if k.endswith("_zero") else "q"] += v.nbytes
    d["total"] = sum(d.values())
    return d


def machine_note(threads: int) -> str:
    import onnxruntime

    cpu = "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = set()
    try:
        flags = set(next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split())
    except (OSError, StopIteration):
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_fp16") if f in flags]
    if isa:
        cpu += f" ({' '.join(isa)})"
    return (f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}, Python "
            f"{platform.python_version()}, onnxruntime {onnxruntime.__version__} (CPUExecutionProvider), "
            f"intra-op threads {threads}")


# ---------------------------------------------------------------- main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=2048,
                    help="vocabulary (lm_head stays fp32); 2048 gives the lm_head the ~2%% share of weights it has in LLaVA-1.5-7B")
    ap.add_argument("--image", type=int, default=336)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--stages", default="1,2,4", help="pruning stage layers")
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=11, help="interleaved prefill repeats per variant")
    ap.add_argument("--profile-rounds", type=int, default=5, help="interleaved profiled prefill runs per variant")
    ap.add_argument("--decode-steps", type=int, default=8, help="decode steps timed per repeat")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (all sessions)")
    ap.add_argument("--small", action="store_true", help="smoke configuration: hidden 256, 6 layers, 3 repeats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "latency.md"), help="markdown output ('-' = stdout)")
    a = ap.parse_args(argv)
    if a.small:
        a.hidden, a.layers, a.heads, a.intermediate, a.repeats, a.decode_steps, a.profile_rounds = 256, 6, 4, 704, 3, 4, 3
    return a


def main(argv=None) -> int:
    import torch
    from tqdm import tqdm

    a = parse(argv)
    torch.set_num_threads(max(1, a.threads))
    t_start = time.time()
    load0 = os.getloadavg()
    n_visual = (a.image // a.patch) ** 2
    T = TEXT_BEFORE + n_visual + TEXT_AFTER
    stage_layers = [int(x) for x in a.stages.split(",") if int(x) < a.layers]
    keeps = schedule(n_visual, a.layers, stage_layers, a.budget)
    stages = list(zip(stage_layers, keeps))

    adapter = make_adapter(a.hidden, a.layers, a.heads, a.intermediate, a.vocab, a.image, a.patch, a.seed)
    spec = adapter.decoder_spec()
    full = make_recipe("w4a4kv4", "w4a4kv4", n_visual, [], 1.0)
    pruned = make_recipe("quota", "w4a4kv4", n_visual, stages, a.budget)
    recipes = {  # graph folder -> (recipe, fp64 reductions)
        "fp32": (make_recipe("fp32", "fp", n_visual, [], 1.0), False),  # the plain FP32 model
        "w4a4kv4": (full, True),  # the default, what `build` ships
        "quota": (pruned, True),
        "w4a4kv4-r32": (full, False),
        "quota-r32": (pruned, False),
        "w4a4kv4-int": (make_recipe("w4a4kv4-int", "w4a4kv4", n_visual, [], 1.0, "integer"), True),
        "quota-int": (make_recipe("quota-int", "w4a4kv4", n_visual, stages, a.budget, "integer"), True),
        "w4a4kv4-intch": (make_recipe("w4a4kv4-intch", "w4a4kv4", n_visual, [], 1.0, "integer", True), True),
        "quota-intch": (make_recipe("quota-intch", "w4a4kv4", n_visual, stages, a.budget, "integer", True), True),
    }
    kept = pruned.kept_per_layer(spec.num_layers)
    variants = list(VARIANTS)

    with tempfile.TemporaryDirectory(prefix="quota_latency_") as td:
        tmp = Path(td)
        paths: dict[str, dict[str, Path]] = {}
        sizes: dict[str, dict[str, int]] = {}
        models = {}
        for folder, (recipe, fp64) in tqdm(recipes.items(), desc="lower", unit="variant"):
            pre, dec = lower_variant(adapter, recipe, n_visual, TEXT_BEFORE, fp64)
            (tmp / folder).mkdir()
            paths[folder] = {"prefill": tmp / folder / "prefill.onnx", "decode": tmp / folder / "decode.onnx"}
            sizes[folder] = {"prefill": save(pre, paths[folder]["prefill"]), "decode": save(dec, paths[folder]["decode"])}
            if folder != "fp32":
                models[folder] = pre
            del pre, dec
        (tmp / "ort-int4").mkdir()
        paths["ort-int4"] = {g: tmp / "ort-int4" / f"{g}.onnx" for g in ("prefill", "decode")}
        for g in tqdm(("prefill", "decode"), desc="ort-int4 quantizer", unit="graph"):
            ort_int4(paths["fp32"][g], paths["ort-int4"][g], PEER_LEVEL)
        sizes["ort-int4"] = {g: paths["ort-int4"][g].stat().st_size for g in ("prefill", "decode")}
        del adapter

        ops = {f: op_counts(paths[f]["decode"], a.threads, tmp) for f in paths}

        rng = np.random.default_rng(a.seed)
        emb = rng.standard_normal((1, T, spec.hidden)).astype(np.float32)
        feeds = {"inputs_embeds": emb, "position_ids": np.arange(T, dtype=np.int64)[None]}
        dfeed = {"inputs_embeds": rng.standard_normal((1, 1, spec.hidden)).astype(np.float32),
                 "position_ids": np.array([[T]], np.int64)}

        sess = {}
        for v in tqdm(variants, desc="sessions", unit="variant"):
            folder, level = VARIANTS[v]
            sess[v] = {g: session(paths[folder][g], a.threads, level) for g in ("prefill", "decode")}
        # warm-up; the prefill outputs give each variant's decode past
        past, cache = {}, {}
        for v in tqdm(variants, desc="warm-up", unit="variant"):
            s = sess[v]["prefill"]
            out = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
            cache[v] = kv_bytes(out)
            past[v] = {k.replace("present.", "past.", 1): x for k, x in out.items() if k.startswith("present.")}
            sess[v]["decode"].run(None, {**dfeed, **past[v]})
        del out

        timed = Timed({v: [] for v in variants}, {v: [] for v in variants})
        order = list(variants)
        shuffle = np.random.default_rng(a.seed + 1)
        for _ in tqdm(range(a.repeats), desc="timing (interleaved)", unit="repeat"):
            shuffle.shuffle(order)
            for v in order:
                t0 = time.perf_counter()
                sess[v]["prefill"].run(None, feeds)
                timed.prefill[v].append(time.perf_counter() - t0)
            shuffle.shuffle(order)
            for v in order:
                s, f = sess[v]["decode"], {**dfeed, **past[v]}
                t0 = time.perf_counter()
                for _ in range(a.decode_steps):
                    s.run(None, f)
                timed.decode[v].append((time.perf_counter() - t0) / a.decode_steps)
        sess.clear()

        split = profile_split(list(PROFILED), paths, dict.fromkeys(PROFILED, feeds), a.threads, tmp, a.profile_rounds,
                              a.seed + 2)
        dsplit = profile_split(list(DECODE_PROFILED), paths, {v: {**dfeed, **past[v]} for v in DECODE_PROFILED},
                               a.threads, tmp, 4 * a.decode_steps, a.seed + 3, graph="decode")
        int4 = int4_storage(models["quota"])

    load1 = os.getloadavg()
    md = report(a, spec, n_visual, T, stages, kept, timed, cache, sizes, split, ops, int4, time.time() - t_start,
                load0, load1, dsplit)
    if a.out == "-":
        print(md)
    else:
        Path(a.out).write_text(md)
        print(f"wrote {a.out}")
    return 0


def report(a, spec, n_visual, T, stages, kept, timed: Timed, cache, sizes, split, ops, int4, secs, load0, load1,
           dsplit) -> str:
    L = spec.num_layers
    text = T - n_visual
    ideal = sum(k + text for k in kept) / (L * T)
    pf, dc = timed.prefill, timed.decode
    def ms(xs):
        return f"{med(xs) * 1e3:.1f}"

    fp16_full = 2 * L * spec.kv_heads * T * spec.head_dim * 2
    kvq = cache["quota@1"]
    kv_ratio = kvq["total"] / fp16_full
    per_tok = spec.head_dim // 2 + 4 + 1  # 4-bit payload + fp32 scale + uint8 zero per head (group = head_dim)
    cmd = "python benchmarks/latency.py" + ("" if not a.small else " --small")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    desc = {
        "fp32": "FP32, all tokens",
        "ort-int4@4": "ORT MatMulNBitsQuantizer on the fp32 graphs (W4 block 32 sym, accuracy_level 4; A and KV fp32), all tokens",
        "w4a4kv4@1": "W4A4KV4 as `build` lowers it, all tokens; MatMulNBits level 1 (exact, as `OrtRunner` runs it)",
        "quota@1": "W4A4KV4 + QUOTA schedule; level 1",
        "w4a4kv4@4": "W4A4KV4, all tokens; level 4 (int8 activations in the kernel)",
        "quota@4": "W4A4KV4 + QUOTA schedule; level 4",
        "w4a4kv4-r32@1": "w4a4kv4@1 with `export.reductions: fp32` (not what `build` ships)",
        "quota-r32@1": "quota@1 with `export.reductions: fp32` (not what `build` ships)",
        "w4a4kv4-int": "W4A4KV4 with `export.matmul: integer` (MatMulInteger; same weights and bits as w4a4kv4@1), all tokens",
        "quota-int": "quota@1 with `export.matmul: integer`",
        "w4a4kv4-intch": "w4a4kv4-int with per-output-channel weight scales (one GEMM per linear), all tokens",
        "quota-intch": "quota-int with per-output-channel weight scales",
    }
    lines = [
        "# Latency, KV cache and size: what pruning + low-bit buy (ONNX Runtime CPU)",
        "",
        f"Command: `{cmd}` (all variants measured side by side in one run, {a.repeats} interleaved repeats, "
        f"order shuffled per repeat; {a.decode_steps} decode steps per repeat). Date: {now}. Run time {secs / 60:.1f} min.",
        "",
        f"Machine: {machine_note(a.threads)}. Load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end: "
        "these machines are noisy (other jobs may share the 2 cores), so read the ratios (medians of per-repeat "
        "paired ratios), not the absolute times.",
        "",
        "Numerics (as `build` lowers them since the exact-parity change): quantized matmuls are integer-exact (weight "
        "group scales snapped per row; the activations enter the MatMul as integers through QuantizeLinear -> Cast, "
        "and the per-token scale multiplies the MatMul output), and with `export.reductions: fp64` (the default) "
        "RMSNorm statistics, RoPE tables, attention (QK, softmax, PV), SiLU and the pruning signals run in float64 "
        "(Cast to double ... Cast back to float). The `-r32` variants are the same graphs with those reductions in "
        "fp32; the `fp32` baseline and the peer derived from it are the plain FP32 model (fp32 reductions).",
        "",
        "`@1` / `@4`: the session's `session.qdq_matmulnbits_accuracy_level`, which ONNX Runtime gives the MatMulNBits "
        "nodes it fuses from DequantizeLinear(int4 weight) + MatMul: 1 computes in fp32 and is exact (what "
        "`OrtRunner` sets, and what the build's parity check runs); 4 (ONNX Runtime's default) re-quantizes the "
        "incoming activation integers to int8 per block with a float scale inside the kernel, faster where int8 dot "
        "products are, not bit-exact to reference.py. The peer's quantizer is given accuracy_level 4.",
        "",
        f"Model: random-weight LLaVA-architecture decoder, hidden {spec.hidden}, {L} layers, intermediate "
        f"{spec.intermediate}, {spec.heads} heads (MHA, head_dim {spec.head_dim}), vocab {spec.vocab} (lm_head fp32, "
        f"{spec.vocab * spec.hidden / (L * (4 * spec.hidden**2 + 3 * spec.hidden * spec.intermediate)) * 100:.0f}% of "
        "the decoder-layer weights; ~2% in LLaVA-1.5-7B). Decoder graphs only (lowered with `DecoderLowering`, no vision "
        f"tower, no parity check), fed random embeddings in the LLaVA-1.5 layout: {TEXT_BEFORE} text + {n_visual} "
        f"visual + {TEXT_AFTER} text tokens (T = {T}).",
        "",
        f"Schedule (budget {a.budget}): " + ", ".join(f"layer {l}: keep {k}" for l, k in stages)
        + f"; visual tokens per layer {kept}, mean {sum(kept) / L:.1f} = {sum(kept) / (L * n_visual):.3f} of {n_visual}.",
        "",
        "## Prefill (T = %d)" % T,
        "",
        "| variant | median ms | vs fp32 | what |",
        "|---|---:|---:|---|",
    ]
    for v in VARIANTS:
        lines.append(f"| {v} | {ms(pf[v])} | {paired(pf[v], pf['fp32']):.3f} | {desc[v]} |")
    lines += ["", *goals_section(pf, dc), ""]
    lines += [
        "| pruned / unpruned at the same precision | measured | ideal | measured / ideal | goal |",
        "|---|---:|---:|---:|---|",
    ]
    ratio = {}
    for u, p in PAIRS:
        ratio[p] = paired(pf[p], pf[u])
        lines.append(f"| {p} / {u} | {ratio[p]:.3f} | {ideal:.3f} | {ratio[p] / ideal:.3f}x | <= 1.15x |")
    lines += [
        "",
        f"Ideal = tokens processed summed over layers, pruned / unpruned = sum(kept_l + {text}) / ({L} x {T}) = {ideal:.3f}.",
        "",
        "Where the prefill time goes (ONNX Runtime profiler, kernel ms per run, median over the profiled runs, "
        "which are interleaved like the timed ones; node categories from the node names of the lowered graph). "
        "*Excess* = pruned - ideal x unpruned: it sums to the gap to the ideal; negative is better than ideal.",
        "",
        "| category | " + " | ".join(f"{u} | {p} | excess" for u, p in PAIRS) + " |",
        "|---|" + "---:|---:|---:|" * len(PAIRS),
    ]
    tot = {v: sum(split[v].values()) for v in split}
    exc = {}
    for c in CATEGORIES:
        row = [c]
        for u, p in PAIRS:
            e = split[p][c] - ideal * split[u][c]
            exc[(p, c)] = e
            row += [f"{split[u][c]:.1f}", f"{split[p][c]:.1f}", f"{e:+.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    row = ["**total**"]
    for u, p in PAIRS:
        row += [f"{tot[u]:.1f}", f"{tot[p]:.1f}", f"{tot[p] - ideal * tot[u]:+.1f}"]
    lines.append("| " + " | ".join(row) + " |")
    prev = [n_visual] + [k for _, k in stages[:-1]]
    stage_rows = [(pv + text, k + text) for pv, (_, k) in zip(prev, stages)]
    lines += ["", *analysis(split, tot, exc, ideal, ratio, stage_rows)]
    lines += [
        "",
        "## Decode step (cache as left by this variant's prefill)",
        "",
        "| variant | cache rows per layer | KV cache bytes | median ms / step | vs fp32 |",
        "|---|---|---:|---:|---:|",
    ]
    for v in VARIANTS:
        toks = [k + text for k in kept] if v.startswith("quota") else [T] * L
        tl = f"{toks[0]}..{toks[-1]}" if len(set(toks)) > 1 else f"{toks[0]}"
        lines.append(f"| {v} | {tl} | {cache[v]['total'] / 1e6:.2f} MB | {ms(dc[v])} | {paired(dc[v], dc['fp32']):.3f} |")
    lines += [
        f"| (FP16 cache, all tokens, for reference) | {T} | {fp16_full / 1e6:.2f} MB | | |",
        "",
        "Pruned / unpruned decode step at the same precision: "
        + ", ".join(f"{p} / {u} = {paired(dc[p], dc[u]):.3f}" for u, p in PAIRS)
        + ". The decode graph dequantizes the whole KV4 past of every layer at every step (unpack, subtract the "
        "zero point, multiply by the scale), so fewer cache rows mean less work per step as well as fewer bytes.",
        "",
        "Op types in the decode graphs as ONNX Runtime optimizes them (did the 4-bit weights fuse into MatMulNBits?):",
        "",
        "| graphs | MatMulNBits | MatMulInteger | MatMul | DequantizeLinear | Cast |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f, c in ops.items():
        lines.append(f"| {f} | {c.get('MatMulNBits', 0)} | {c.get('MatMulInteger', 0)} | {c.get('MatMul', 0)} "
                     f"| {c.get('DequantizeLinear', 0)} | {c.get('Cast', 0)} |")
    n64 = ops["w4a4kv4"].get("Cast", 0) - ops["w4a4kv4-r32"].get("Cast", 0)
    lines += [
        "",
        "The activations enter each 4-bit MatMul as integers (QuantizeLinear -> Cast; the per-token scale multiplies "
        "the MatMul output), so no activation DequantizeLinear is left; the weight DequantizeLinears fuse into "
        f"MatMulNBits. With fp64 reductions the decode graph carries {n64} more Casts (to double and back) than with "
        "fp32 reductions.",
    ]
    q_t = sum(k + text for k in kept)
    lines += ["", *integer_section(pf, dc, split, ms)]
    lines += ["", *decode_profile_section(dsplit)]
    lines += ["", *reductions_section(pf, dc, split, ideal, cache, ms)]
    lines += [
        "",
        "## KV cache after prefill",
        "",
        "| cache | bytes | / FP16 full-token |",
        "|---|---:|---:|",
        f"| FP16, all tokens ({L} layers x {T} tokens) | {fp16_full:,} | 1.000 |",
        f"| FP32, all tokens (fp32 graphs) | {cache['fp32']['total']:,} | {cache['fp32']['total'] / fp16_full:.3f} |",
        f"| KV4, all tokens (w4a4kv4) | {cache['w4a4kv4@1']['total']:,} | {cache['w4a4kv4@1']['total'] / fp16_full:.3f} |",
        f"| **KV4 + pruning (quota)** | **{kvq['total']:,}** | **{kv_ratio:.4f}** (goal <= 0.09) |",
        f"| of which 4-bit payload (uint8, two per byte) | {kvq['q']:,} | {kvq['q'] / fp16_full:.4f} |",
        f"| of which scales (fp32, one per row, head and k/v: group = head_dim) | {kvq['scale']:,} | {kvq['scale'] / fp16_full:.4f} |",
        f"| of which zero points (uint8) | {kvq['zero']:,} | {kvq['zero'] / fp16_full:.4f} |",
        f"| same with fp16 scales (what-if) | {kvq['total'] - kvq['scale'] // 2:,} | {(kvq['total'] - kvq['scale'] // 2) / fp16_full:.4f} |",
        f"| same with fp16 scales and 4-bit zero points (what-if) | {kvq['total'] - kvq['scale'] // 2 - kvq['zero'] // 2:,} | "
        f"{(kvq['total'] - kvq['scale'] // 2 - kvq['zero'] // 2) / fp16_full:.4f} |",
        "",
        kv_same_note(cache),
        "",
        f"The ratio is the product of the row ratio (cache rows held, {q_t} / {L * T} = {q_t / (L * T):.4f}: the "
        f"{text} text tokens stay in every layer) and the bytes per row and head ({per_tok} / {2 * spec.head_dim} = "
        f"{per_tok / (2 * spec.head_dim):.4f}: {spec.head_dim // 2} payload + 4 scale + 1 zero point vs "
        f"{2 * spec.head_dim} in FP16). To reach 0.09 with {per_tok}-byte rows the row ratio must be <= "
        f"{0.09 / (per_tok / (2 * spec.head_dim)):.3f} (a lower budget); at this row ratio a row may take "
        f"{0.09 / (q_t / (L * T)) * 2 * spec.head_dim:.1f} bytes per head, i.e. "
        f"{0.09 / (q_t / (L * T)) * 2 * spec.head_dim - spec.head_dim // 2:.1f} bytes for scale + zero point beside the "
        f"{spec.head_dim // 2}-byte payload (an fp16 scale + uint8 zero point take 3; shared by two heads, 1.5).",
        "",
        "## Graph files",
        "",
        "| graphs | prefill.onnx | decode.onnx | vs fp32 |",
        "|---|---:|---:|---:|",
    ]
    f32 = sizes["fp32"]["prefill"] + sizes["fp32"]["decode"]
    for f in ("fp32", "ort-int4", "w4a4kv4", "quota", "w4a4kv4-r32", "quota-r32", "w4a4kv4-int", "quota-int",
              "w4a4kv4-intch", "quota-intch"):
        sz = sizes[f]
        lines.append(f"| {f} | {sz['prefill'] / 1e6:.1f} MB | {sz['decode'] / 1e6:.1f} MB | {(sz['prefill'] + sz['decode']) / f32:.3f} |")
    stored, packed = int4
    q_pre = sizes["quota"]["prefill"] - stored + packed
    if stored > packed * 1.05:
        lines += [
            "",
            f"Our 4-bit weights are written through `onnx.helper.make_tensor` with a list of ints, which stores them "
            f"as varint `int32_data`: {stored / 1e6:.1f} MB in the quota prefill graph for {packed / 1e6:.1f} MB of "
            f"packed nibbles. Written as `raw_data` the prefill graph would be {q_pre / 1e6:.1f} MB "
            f"({q_pre / sizes['fp32']['prefill']:.3f} of fp32; the rest is the fp32 group scales, 1 per 32 weights, "
            "and the fp32 lm_head). ONNX Runtime's quantizer writes raw bytes.",
        ]
    return "\n".join(lines) + "\n"


def integer_section(pf, dc, split, ms) -> list[str]:
    """The integer GEMM rows (`export.matmul: integer`) against fp32, the int4 peer and the float form."""
    out = [
        "## Integer GEMMs (`export.matmul: integer`)",
        "",
        "Paired ratios from the same interleaved run. The `-int` graphs compute the same bits as the float form "
        "of the same weights (`w4a4kv4@1` / `quota@1`; checked by `verify` on the shipped model); `-intch` uses "
        "per-output-channel weight scales, i.e. other weights (one GEMM per linear instead of one per scale-digit "
        "plane).",
        "",
        "| variant | prefill ms | vs fp32 | vs ort-int4@4 | vs float form | decode ms / step | vs fp32 | "
        "vs ort-int4@4 | vs float form |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, ref in INT_ROWS:
        row = [v]
        for t in (pf, dc):
            vs = f"{paired(t[v], t[ref]):.3f}" if ref else "-"
            row += [ms(t[v]), f"{paired(t[v], t['fp32']):.3f}", f"{paired(t[v], t['ort-int4@4']):.3f}", vs]
        out.append("| " + " | ".join(row) + " |")
    ints = [p for p in PAIRS if p[0].endswith("-int")]
    if ints:
        u, p = ints[0]
        out += [
            "",
            f"Where the integer prefill goes (profiler, kernel ms per run; the category table above has `{u}` and "
            f"`{p}` beside the float form): linear layers {split[u][LINEAR]:.1f} ms of {sum(split[u].values()):.1f} "
            f"({split[u][LINEAR] / sum(split[u].values()):.0%}) unpruned, attention {split[u][ATTN]:.1f} ms "
            f"({split[u][ATTN] / sum(split[u].values()):.0%}); pruned: linear layers {split[p][LINEAR]:.1f} ms of "
            f"{sum(split[p].values()):.1f} ({split[p][LINEAR] / sum(split[p].values()):.0%}), attention "
            f"{split[p][ATTN]:.1f} ms ({split[p][ATTN] / sum(split[p].values()):.0%}), stage signals "
            f"{split[p][S_SIG]:.1f} ms.",
        ]
    return out


GOALS = (  # (what, graph, variants, bound vs fp32, also below the peer)
    ("W4A4KV4, all tokens, prefill <= 0.5x FP32", "prefill", ("w4a4kv4@1", "w4a4kv4-int", "w4a4kv4-intch"), 0.5, False),
    ("QUOTA 30% prefill <= 0.2x FP32", "prefill", ("quota@1", "quota-int", "quota-intch"), 0.2, False),
    ("QUOTA decode step <= 0.4x FP32 and below the int4 peer", "decode", ("quota@1", "quota-int", "quota-intch"), 0.4, True),
)


def goals_section(pf, dc) -> list[str]:
    """The speed goals of the exact W4A4 graphs against this run's ratios."""
    out = [
        "## Speed goals of the exact W4A4 graphs",
        "",
        "Ratios from this run (paired medians). Every variant here is exact (`@1`: MatMulNBits level 1; `-int`: "
        "MatMulInteger, the same bits as `@1`; `-intch`: per-output-channel weight scales, other weights).",
        "",
        "| goal | variant | vs fp32 | vs ort-int4@4 | met |",
        "|---|---|---:|---:|---|",
    ]
    for what, graph, vs, bound, peer in GOALS:
        t = pf if graph == "prefill" else dc
        for v in vs:
            r, rp = paired(t[v], t["fp32"]), paired(t[v], t["ort-int4@4"])
            ok = r <= bound and (not peer or rp < 1.0)
            out.append(f"| {what} | {v} | {r:.3f} | {rp:.3f} | {'yes' if ok else 'no'} |")
    return out


def decode_profile_section(dsplit) -> list[str]:
    """Where a decode step goes (profiler, kernel ms per step), pruned graphs against fp32 and the peer."""
    vs = list(dsplit)
    out = [
        "## Where a decode step goes",
        "",
        "ONNX Runtime profiler, kernel ms per step (median over the profiled steps, interleaved), the cache as "
        "left by each variant's prefill. *KV-cache read* is the decode graph's unpacking and dequantization of the "
        "whole 4-bit past of every layer at every step.",
        "",
        "| category | " + " | ".join(vs) + " |",
        "|---|" + "---:|" * len(vs),
    ]
    for c in CATEGORIES:
        if any(dsplit[v][c] > 0 for v in vs):
            out.append(f"| {c} | " + " | ".join(f"{dsplit[v][c]:.2f}" for v in vs) + " |")
    out.append("| **total** | " + " | ".join(f"{sum(dsplit[v].values()):.2f}" for v in vs) + " |")
    return out


def kv_same_note(cache) -> str:
    same = all(cache[f][k] == cache[r][k] for f, r in R32_PAIRS for k in ("q", "scale", "zero", "total"))
    pairs = ", ".join(f"{f} {cache[f]['total']:,} vs {r} {cache[r]['total']:,}" for f, r in R32_PAIRS)
    if same:
        return (f"The fp64 reductions leave the KV cache bytes unchanged ({pairs}): they live inside the graphs, and "
                "the cache crosses the graph boundary as uint8 4-bit payload + fp32 scales + uint8 zero points either way.")
    return f"**The KV cache bytes differ between fp64 and fp32 reductions** ({pairs})."


def reductions_section(pf, dc, split, ideal, cache, ms) -> list[str]:
    """What `export.reductions: fp64` (the default) costs against fp32 reductions, level 1 (exact)."""
    (fu, ru), (fp, rp) = R32_PAIRS
    out = [
        "## What the fp64 reductions cost (`export.reductions: fp64` vs `fp32`, level 1)",
        "",
        "Same weights, same schedule, same KV cache format; only RMSNorm statistics, RoPE tables, attention (QK, "
        "softmax, PV), SiLU and the pruning signals change precision. Ratios are medians of per-repeat paired ratios "
        "from the same interleaved run as above.",
        "",
        "| | fp64 (default) ms | fp32 reductions ms | fp64 / fp32 |",
        "|---|---:|---:|---:|",
    ]
    for what, t in (("prefill", pf), ("decode step", dc)):
        for lab, f, r in (("unpruned", fu, ru), ("pruned", fp, rp)):
            out.append(f"| {what}, {lab} (`{f}` / `{r}`) | {ms(t[f])} | {ms(t[r])} | **{paired(t[f], t[r]):.3f}** |")
    out += [
        "",
        f"Pruned / unpruned with fp32 reductions: prefill {paired(pf[rp], pf[ru]):.3f} (ideal {ideal:.3f}, "
        f"{paired(pf[rp], pf[ru]) / ideal:.3f}x; with fp64 {paired(pf[fp], pf[fu]):.3f}, {paired(pf[fp], pf[fu]) / ideal:.3f}x), "
        f"decode step {paired(dc[rp], dc[ru]):.3f} (with fp64 {paired(dc[fp], dc[fu]):.3f}). "
        f"KV cache: {cache[fp]['total']:,} bytes with fp64, {cache[rp]['total']:,} with fp32 reductions.",
        "",
        "Where the fp64 cost goes in prefill (profiler, kernel ms per run, as above; *fp64 cost* = fp64 - fp32):",
        "",
        "| category | " + " | ".join(f"{r} | {f} | fp64 cost" for f, r in R32_PAIRS) + " |",
        "|---|" + "---:|---:|---:|" * len(R32_PAIRS),
    ]
    for c in CATEGORIES:
        row = [c]
        for f, r in R32_PAIRS:
            row += [f"{split[r][c]:.1f}", f"{split[f][c]:.1f}", f"{split[f][c] - split[r][c]:+.1f}"]
        out.append("| " + " | ".join(row) + " |")
    row = ["**total**"]
    for f, r in R32_PAIRS:
        tf, tr = sum(split[f].values()), sum(split[r].values())
        row += [f"{tr:.1f}", f"{tf:.1f}", f"{tf - tr:+.1f} ({tf / tr:.3f})"]
    out.append("| " + " | ".join(row) + " |")
    return out


def analysis(split, tot, exc, ideal, ratio, stage_rows) -> list[str]:
    """A few generated lines: where the gap to the ideal ratio comes from (numbers from the profile).
    `stage_rows` (rows before/after each gather) is unused since pruning layers reuse the scoring
    pass's q/k/v; kept in the signature for the caller."""
    out = ["Where the gap to the ideal comes from:", ""]
    for u, p in PAIRS:
        gap = tot[p] - ideal * tot[u]
        stage = sum(exc[(p, c)] for c in (S_QKV, S_SIG, S_GATHER))
        fixed = exc[(p, WDQ)]
        attn = exc[(p, ATTN)]
        rest = gap - stage - fixed - attn
        wdq = f"; the per-run weight dequantization (a fixed cost) {fixed:+.1f} ms" if split[u][WDQ] > 0 else ""
        out.append(
            f"- `{p}` vs `{u}` (profiled ratio {tot[p] / tot[u]:.3f}, timed {ratio[p]:.3f}, ideal {ideal:.3f}): of the "
            f"{gap:+.1f} ms excess over the ideal, the scoring at the stages adds {stage:+.1f} ms "
            f"({split[p][S_QKV]:.1f} ms q/k/v pass over all current tokens, {split[p][S_SIG]:.1f} ms signals, "
            f"{split[p][S_GATHER]:.1f} ms gather){wdq}; the attention {attn:+.1f} ms (its T^2 part shrinks faster than "
            f"the token count); everything else {rest:+.1f} ms (costs that do not shrink with the visual tokens: the "
            f"text rows, the last-position lm_head, per-node overheads). The stage's q/k/v pass is the pruning "
            f"layer's own projection (the layer reuses the kept rows of it), so the real overhead of scoring is the "
            f"signals and the gather."
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
