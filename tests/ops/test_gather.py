"""quota::TokenGather: Triton kernel (TRITON_INTERPRET=1) == numpy reference == ONNX subgraph on
onnxruntime, exactly; the kernel compiles ahead of time to PTX that ptxas assembles; TensorRT parts
skip with their reason where TensorRT / a GPU is missing. Shapes come from the plugin's config.yaml."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernel is decorated at import

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import TensorProto

from quota_export.ops.gather import make_gather_model, stable_topk

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # plugins/ is not an installed package
    sys.path.insert(0, str(ROOT))

from plugins.quotaTokenGather.reference import select_kept, token_gather_reference  # noqa: E402

CONFIG = yaml.safe_load((ROOT / "plugins" / "quotaTokenGather" / "config.yaml").read_text())["tests"]
NO_TRT = "TensorRT not installed (cannot be installed on this machine)"
torch.set_num_threads(1)


def kernel_module():
    pytest.importorskip("triton", reason="triton not installed (pip install -e .[plugin])")
    from triton.runtime.interpreter import InterpretedFunction

    from plugins.quotaTokenGather import kernel

    if not isinstance(kernel.token_gather_kernel, InterpretedFunction):
        pytest.skip("the kernel module was imported before TRITON_INTERPRET=1 was set in this process")
    return kernel


def make_scores(kind: str, b: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return rng.standard_normal((b, n)).astype(np.float32)
    if kind == "all_equal":
        return np.full((b, n), 0.25, np.float32)
    s = rng.integers(0, 3, (b, n)).astype(np.float32)
    s[s == 0] = np.where(rng.random((s == 0).sum()) < 0.5, -0.0, 0.0)  # -0.0 next to +0.0
    if kind == "nan_inf":
        s[:, ::5] = np.nan
        s[:, 2::7] = -np.inf
    else:
        assert kind == "duplicates", kind
    return s


def make_case(c: dict, seed: int, planes: int = 0):
    rng = np.random.default_rng(seed)
    b, n, h, start = c["batch"], c["n_visual"], c["hidden"], c["start"]
    t = start + n + c["tail"]
    hidden = rng.standard_normal((b, t, h)).astype(np.dtype(c["dtype"]))
    pos_shape = (b, t) if not planes else (planes, b, t)
    pos = rng.integers(0, 10_000, pos_shape).astype(np.int64)
    return hidden, pos, make_scores(c["scores"], b, n, rng)


def run_onnx(hidden, pos, scores, *, k, start, n_visual):
    m = make_gather_model(
        hidden_size=hidden.shape[-1], n_visual=n_visual, k=k, start=start,
        dtype=TensorProto.FLOAT16 if hidden.dtype == np.float16 else TensorProto.FLOAT,
        position_ids_rank=pos.ndim,
    )  # fmt: skip
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"hidden": hidden, "position_ids": pos, "scores": scores})


def assert_same(got, want, what):
    names = ("hidden_out", "position_ids_out", "kept")
    for g, w, name in zip(got, want, names):
        g = g.numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        assert g.dtype == w.dtype and g.shape == w.shape, (what, name, g.dtype, g.shape, w.dtype, w.shape)
        assert np.ascontiguousarray(g).tobytes() == np.ascontiguousarray(w).tobytes(), (what, name)  # bit-exact


def case_id(c):
    shape = f"B{c['batch']}-N{c['n_visual']}-k{c['k']}-H{c['hidden']}"
    return f"{shape}-{c['dtype']}-{c['scores']}-s{c['start']}t{c['tail']}"


# ------------------------------------------------------------------------------- the rule itself


def brute_force_kept(row: np.ndarray, k: int) -> list[int]:
    """rank_i = #{j : s_j > s_i or (s_j == s_i and j < i)}, NaN as -inf; kept iff rank_i < k."""
    s = np.where(np.isnan(row), -np.inf, row)
    n = len(s)
    rank = [sum(1 for j in range(n) if s[j] > s[i] or (s[j] == s[i] and j < i)) for i in range(n)]
    return [i for i in range(n) if rank[i] < k]


def test_reference_is_the_rank_rule_and_stable_topk():
    rng = np.random.default_rng(0)
    for n in (1, 5, 16, 33):
        for kind in ("random", "all_equal", "duplicates", "nan_inf"):
            s = make_scores(kind, 2, n, rng)
            for k in sorted({1, max(1, n // 3), n}):
                got = select_kept(s, k)
                assert [brute_force_kept(r, k) for r in s] == got.tolist(), (n, kind, k)
                assert np.array_equal(stable_topk(torch.from_numpy(s), k).numpy(), got), (n, kind, k)


# ------------------------------------------------------------------- kernel == reference == onnx


@pytest.mark.parametrize("c", CONFIG["cases"], ids=case_id)
def test_kernel_reference_onnx_agree(c):
    kernel = kernel_module()
    hidden, pos, scores = make_case(c, CONFIG["seed"])
    kw = dict(k=c["k"], start=c["start"], n_visual=c["n_visual"])
    want = token_gather_reference(hidden, pos, scores, **kw)
    got = kernel.token_gather(torch.from_numpy(hidden), torch.from_numpy(pos), torch.from_numpy(scores), **kw)
    assert_same(got, want, "kernel")
    assert_same(run_onnx(hidden, pos, scores, **kw), want, "onnx")


@pytest.mark.parametrize("c", CONFIG["mrope"], ids=case_id)
def test_kernel_reference_onnx_agree_mrope_positions(c):
    kernel = kernel_module()
    hidden, pos, scores = make_case(c, CONFIG["seed"], planes=3)
    kw = dict(k=c["k"], start=c["start"], n_visual=c["n_visual"])
    want = token_gather_reference(hidden, pos, scores, **kw)
    got = kernel.token_gather(torch.from_numpy(hidden), torch.from_numpy(pos), torch.from_numpy(scores), **kw)
    assert_same(got, want, "kernel")
    assert_same(run_onnx(hidden, pos, scores, **kw), want, "onnx")


def test_kernel_rejects_bad_attributes():
    kernel = kernel_module()
    h, p, s = torch.zeros(1, 20, 4), torch.zeros(1, 20, dtype=torch.int64), torch.zeros(1, 16)
    for kw in (dict(k=0, start=0), dict(k=17, start=0), dict(k=4, start=5)):
        with pytest.raises(ValueError):
            kernel.token_gather(h, p, s, n_visual=16, **kw)


# -------------------------------------------------------------------------- AOT: PTX + ptxas


def ptxas_path() -> str | None:
    return shutil.which("ptxas") or next(
        (p for p in ("/usr/local/cuda/bin/ptxas", "/usr/local/cuda-13.0/bin/ptxas") if os.path.exists(p)), None
    )


@pytest.mark.parametrize("arch", CONFIG["aot"]["archs"])
@pytest.mark.parametrize("shape", CONFIG["aot"]["shapes"], ids=lambda s: f"{s['dtype']}-N{s['n_visual']}-k{s['k']}")
def test_aot_ptx_compiles_and_assembles(arch, shape, tmp_path):
    pytest.importorskip("triton", reason="triton not installed (pip install -e .[plugin])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a compiler, not the interpreter
    env.update(TRITON_DEFAULT_FP_FUSION="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    ptx_file = tmp_path / "k.ptx"
    cmd = [sys.executable, "-m", "plugins.quotaTokenGather.kernel", "--arch", str(arch), "--dtype", shape["dtype"],
           "--n-visual", str(shape["n_visual"]), "--k", str(shape["k"]), "--out", str(ptx_file)]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads(r.stdout.strip().splitlines()[-1])
    ptx = ptx_file.read_text()
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    assert meta["name"] == "token_gather_kernel" and f".entry {meta['name']}(" in ptx
    assert target in (f"sm_{arch}", f"sm_{arch}a") and re.search(r"^\.version 8\.0$", ptx, re.M)
    ptxas = ptxas_path()
    if ptxas is None:
        pytest.skip("ptxas not found (CUDA toolkit not installed); PTX compiled but not assembled")
    r = subprocess.run([ptxas, f"-arch={target}", "-v", str(ptx_file), "-o", str(tmp_path / "k.cubin")],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill", r.stderr)]
    print(f"\nAOT {target} {shape}: ptx {len(ptx)} bytes, {meta['num_warps']} warps, shared {meta['shared']} B, "
          f"{regs} registers, spills {spills}")  # fmt: skip
    assert regs <= 255 and not any(spills)


# ------------------------------------------------------------------------------------ TensorRT


def test_plugin_module_imports_without_tensorrt():
    from plugins.quotaTokenGather import PLUGIN_ID, plugin

    assert plugin.PLUGIN_ID == PLUGIN_ID == "quota::TokenGather"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="TensorRT"):
            plugin.register()


def test_tensorrt_registration():
    trt = pytest.importorskip("tensorrt", reason=NO_TRT)
    from plugins.quotaTokenGather import plugin

    plugin.register()
    plugin.register()  # idempotent
    names = {(c.name, c.plugin_namespace) for c in trt.get_plugin_registry().all_creators}
    assert ("TokenGather", "quota") in names


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensorrt_engine_matches_reference(dtype):
    trt = pytest.importorskip("tensorrt", reason=NO_TRT)
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    from plugins.quotaTokenGather import plugin

    plugin.register()
    c = dict(batch=2, n_visual=576, k=144, hidden=64, dtype=dtype, scores="duplicates", start=5, tail=11)
    hidden, pos, scores = make_case(c, 0)
    kw = dict(k=c["k"], start=c["start"], n_visual=c["n_visual"])
    want = token_gather_reference(hidden, pos, scores, **kw)
    onnx_dtype = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    m = make_gather_model(hidden_size=c["hidden"], plugin=True, dtype=onnx_dtype, **kw)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(m.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, arr in (("hidden", hidden), ("position_ids", pos), ("scores", scores)):
        profile.set_shape(name, arr.shape, arr.shape, arr.shape)
    config.add_optimization_profile(profile)
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))
    ctx = engine.create_execution_context()
    bufs = {
        "hidden": torch.from_numpy(hidden).cuda(), "position_ids": torch.from_numpy(pos).cuda(),
        "scores": torch.from_numpy(scores).cuda(),
        "hidden_out": torch.empty(want[0].shape, dtype=getattr(torch, dtype), device="cuda"),
        "position_ids_out": torch.empty(want[1].shape, dtype=torch.int64, device="cuda"),
        "kept": torch.empty(want[2].shape, dtype=torch.int64, device="cuda"),
    }  # fmt: skip
    for name, t in bufs.items():
        if name in ("hidden", "position_ids", "scores"):
            ctx.set_input_shape(name, tuple(t.shape))
        ctx.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.Stream()
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    assert_same([bufs[n].cpu() for n in ("hidden_out", "position_ids_out", "kept")], want, "tensorrt")


_GPU_SCRIPT = """
import sys, numpy as np, torch
from plugins.quotaTokenGather.kernel import token_gather
d = np.load(sys.argv[1])
for i in range(int(d["n"])):
    args = [torch.from_numpy(d[f"{i}_{x}"]).cuda() for x in ("hidden", "pos", "scores")]
    k, start, n = (int(v) for v in d[f"{i}_attrs"])
    out = token_gather(*args, k=k, start=start, n_visual=n)
    np.savez(sys.argv[2] + f"_{i}.npz", *[o.cpu().numpy() for o in out])
"""


@pytest.mark.gpu
def test_compiled_kernel_on_gpu_matches_reference(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (on CPU the kernel runs under the interpreter only)")
    cases = CONFIG["cases"]
    arrays, wants = {"n": np.int64(len(cases))}, []
    for i, c in enumerate(cases):
        hidden, pos, scores = make_case(c, CONFIG["seed"])
        arrays.update({f"{i}_hidden": hidden, f"{i}_pos": pos, f"{i}_scores": scores})
        arrays[f"{i}_attrs"] = np.array([c["k"], c["start"], c["n_visual"]])
        wants.append(token_gather_reference(hidden, pos, scores, k=c["k"], start=c["start"], n_visual=c["n_visual"]))
    np.savez(tmp_path / "in.npz", **arrays)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler this time
    r = subprocess.run([sys.executable, "-c", _GPU_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for i, (c, want) in enumerate(zip(cases, wants)):
        got = np.load(tmp_path / f"out_{i}.npz")
        assert_same([got[f"arr_{j}"] for j in range(3)], want, f"gpu {case_id(c)}")
