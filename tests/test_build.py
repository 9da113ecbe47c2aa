"""`build` end to end on tiny random LLaVA checkpoints: parity, determinism, graph contents, CLI.

Every build here checks itself (verify.compare through ONNX Runtime against reference.py) on 12
task-balanced samples of the shipped test split; the tests then read the report in the manifest.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from conftest import ROOT, S_WEIGHTED, TEST_SPLIT, make_tiny_llava

from quota_export.__main__ import main
from quota_export.build import build
from quota_export.recipe import load_recipe

SAMPLES = 12
HEAD_DIM = 16  # hidden 64 / 4 heads in make_tiny_llava


# name -> (model fixture, quant section, stages, budget[, more of the pruning section])
CONFIGS = {
    # the fixture model (4 layers, MHA), the example recipe of the brief
    "w4a4kv4": ("mha", {"scheme": "w4a4kv4"}, [{"layer": 1, "keep": 72}, {"layer": 2, "keep": 30, **S_WEIGHTED}], 0.5),
    # grouped-query attention (4 heads, 2 KV heads, 3 layers), 8-bit cache, one stage
    "w4a4kv8-gqa": ("gqa", {"scheme": "w4a4kv8"}, [{"layer": 1, "keep": 40, **S_WEIGHTED}], 0.6),
    # int8 per-channel weights and activations, fp cache, three stages
    "w8a8": ("mha", {"scheme": "w8a8"},
             [{"layer": 1, "keep": 100}, {"layer": 2, "keep": 60, **S_WEIGHTED}, {"layer": 3, "keep": 20}], 0.6),
    # no quantization at all: pruning only
    "fp": ("mha", {"scheme": "fp"}, [{"layer": 2, "keep": 50, **S_WEIGHTED}], 0.7),
    # weight-only INT4, asymmetric (uint4 + zero point): the MatMulNBits-fusable case
    "w4a16-asym": ("mha", {"scheme": "w4a16", "weights": {"bits": 4, "symmetric": False}},
                   [{"layer": 2, "keep": 36, **S_WEIGHTED}], 0.7),
    # token merging (what calibrate writes): counts out of prefill, into every decode step
    "w4a4kv4-merge": ("mha", {"scheme": "w4a4kv4"}, [{"layer": 1, "keep": 72}, {"layer": 3, "keep": 20, **S_WEIGHTED}],
                      0.55, {"merge": "proportional"}),
}


def write_recipe(path: Path, name: str, model: Path, quant: dict, stages: list, budget: float, max_new: int = 4,
                 pruning: dict | None = None) -> Path:
    doc = {"name": name, "model": str(model), "quant": quant,
           "pruning": {"budget": budget, "n_visual": 144, "stages": stages, **(pruning or {})},
           "export": {"max_new_tokens": max_new}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def models(tiny_llava, tmp_path_factory) -> dict[str, Path]:
    gqa = make_tiny_llava(tmp_path_factory.mktemp("tiny_gqa") / "model", seed=1, layers=3, kv_heads=2)
    return {"mha": tiny_llava, "gqa": gqa}


@pytest.fixture(scope="module")
def built(models, tmp_path_factory):
    """name -> (recipe path, BuildResult); each config is built once, on first use."""
    root = tmp_path_factory.mktemp("builds")
    cache = {}

    def get(name: str):
        if name not in cache:
            which, quant, stages, budget, *pruning = CONFIGS[name]
            r = write_recipe(root / f"{name}.yaml", name, models[which], quant, stages, budget, pruning=(pruning or [None])[0])
            cache[name] = (r, build(load_recipe(r), root / name, str(TEST_SPLIT), SAMPLES, threads=1))
        return cache[name]

    return get


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(built, name):
    _, res = built(name)
    p = res.manifest["parity"]
    n_stages = len(CONFIGS[name][2])
    assert p["samples"] == SAMPLES
    assert p["kept_index_agreement_per_stage"] == [1.0] * n_stages
    assert p["answer_agreement"] == 1.0
    lo = p["logits_sqnr_db_min"]
    assert lo == "inf" or lo >= 40.0, p
    # and what was written is what was returned
    assert json.loads((res.out / "manifest.json").read_text())["parity"] == p


def _tree(d: Path) -> dict[str, bytes]:
    """Every file of a build but its .quota_export marker (a record of this one build: its id)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".quota_export"}


def test_rebuild_via_cli_is_byte_identical(built, tmp_path, capsys):
    """A second build of the same recipe (through the CLI) gives the same bytes, manifest included;
    the CLI's output tells a first-time user what was built, how it checked out and what to run next."""
    recipe, first = built("w4a4kv4")
    out = tmp_path / "again"
    rc = main(["build", "--recipe", str(recipe), "--out", str(out), "--bench", str(TEST_SPLIT), "--samples", str(SAMPLES)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    a, b = _tree(first.out), _tree(out)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    lines = cap.out.splitlines()
    assert lines[0].startswith(f"built {out}/ in ") and "prefill.onnx" in lines[0]
    assert lines[1].startswith(f"parity over {SAMPLES} samples of test.jsonl: kept-index agreement 100.0%, answer agreement 100.0%")
    assert lines[2].startswith(f"try it:  python -m quota_export run --artifacts {out} --image ")
    steps = [ln for ln in cap.err.splitlines() if ln.startswith("[")]
    assert [s[:5] for s in steps] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    assert not list(tmp_path.glob(".again*")), "temporary folder left behind"


def test_manifest_documented_keys(built):
    _, res = built("w4a4kv4")
    m = json.loads((res.out / "manifest.json").read_text())
    for k in ("recipe", "recipe_hash", "target", "model", "schedule", "kept_per_layer", "kv_cache", "export",
              "graphs", "versions", "parity"):
        assert k in m, k
    assert m["recipe_hash"] == load_recipe(res.out / "recipe.yaml").content_hash()
    assert m["schedule"] == [{"layer": 1, "keep": 72, "select": "topk"}, {"layer": 2, "keep": 30, "select": "topk"}]
    assert m["kept_per_layer"] == [144, 72, 30, 30]
    assert set(m["graphs"]) == {"vision.onnx", "embed.onnx", "prefill.onnx", "decode.onnx"}
    for g, info in m["graphs"].items():
        assert {"bytes", "sha256", "inputs", "outputs"} <= set(info)
        assert info["bytes"] == (res.out / g).stat().st_size
    assert {"torch", "onnx", "onnxruntime", "transformers", "quota_export"} <= set(m["versions"])
    pre = {o["name"]: o for o in m["graphs"]["prefill.onnx"]["outputs"]}
    assert pre["kept.0"]["shape"] == [1, 72] and pre["kept.1"]["shape"] == [1, 30]
    assert not [x for x in pre if x.startswith("merge.")]  # merge: none (the recipe default)


def test_merge_graph_io(built):
    """merge.{s}: the counts after stage s, a prefill output and a decode input of the same shape;
    the runner hands them over (the build's parity ran prefill + decode through it)."""
    _, res = built("w4a4kv4-merge")
    g = res.manifest["graphs"]
    want = [{"name": "merge.0", "dtype": "float", "shape": [1, 72]}, {"name": "merge.1", "dtype": "float", "shape": [1, 20]}]
    assert [o for o in g["prefill.onnx"]["outputs"] if o["name"].startswith("merge.")] == want
    assert [i for i in g["decode.onnx"]["inputs"] if i["name"].startswith("merge.")] == want
    import torch

    from quota_export.build import load_deployed
    from quota_export.data import load_bench, load_image
    from quota_export.runtime.ort import OrtRunner

    ad, dep = load_deployed(load_recipe(res.out / "recipe.yaml"))
    runner = OrtRunner(res.out, threads=1)
    s = load_bench(TEST_SPLIT, limit=1)[0]
    run = runner.generate(load_image(s), s.question, 4)
    pr = ad.prompt(load_image(s), s.question)
    toks, ref = dep.generate(pr, 4, embeds=torch.from_numpy(runner.embeds(*runner.encode(load_image(s), s.question))))
    assert run.tokens == toks and [c.shape for c in run.merge] == [(1, 72), (1, 20)]
    for c, st in zip(run.merge, dep.cfg.stages):  # the counts behind the reference's key bias, exactly
        assert c.sum() == 144 and torch.equal(dep.key_bias(torch.from_numpy(c[0]).double(), pr.visual_start),
                                              ref.cache[st.layer].bias)


# ---------------------------------------------------------------- graph contents


def _consts(m: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in m.graph.initializer}


def test_prefill_nodes(built):
    recipe, res = built("w4a4kv4")
    m = onnx.load(res.out / "prefill.onnx")
    names = {n.name for n in m.graph.node}
    assert "/model/layers.1/attn/q_proj/MatMul" in names
    inits = _consts(m)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    # INT4 weights: DequantizeLinear over INT4 constants, blocked along the input axis
    wdq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
           and inits[n.input[0]].data_type == onnx.TensorProto.INT4]
    assert len(wdq) == 4 * 7  # 4 layers x 7 linears
    assert all({a.name: a.i for a in n.attribute} == {"axis": 0, "block_size": 32} for n in wdq)
    # INT4 activations: QuantizeLinear with an in-graph (non-constant) scale
    aq = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert aq and all(n.input[1] not in inits for n in aq)
    assert all(next(a.i for a in n.attribute if a.name == "output_dtype") == onnx.TensorProto.INT4 for n in aq)
    # one scoring TopK (largest=1) per stage, inside the stage's scope, its k a constant = the stage's keep
    topk = [n for n in m.graph.node if n.op_type == "TopK" and _attr(n, "largest", 1) == 1]
    assert [n.name.split("/prune/")[0] for n in topk] == ["/model/layers.1", "/model/layers.2"]
    assert [int(_constant(m, n.input[1]).reshape(-1)[0]) for n in topk] == [72, 30]
    assert ops["TopK"] == 2 * len(topk)  # + the ascending re-sort of each stage's indices


def _attr(node, name, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _constant(m: onnx.ModelProto, tensor: str) -> np.ndarray:
    """The value of a tensor that is an initializer or a Constant node's output (else: not constant)."""
    for t in m.graph.initializer:
        if t.name == tensor:
            return onnx.numpy_helper.to_array(t)
    for n in m.graph.node:
        if n.op_type == "Constant" and n.output[0] == tensor:
            return onnx.numpy_helper.to_array(_attr(n, "value"))
    raise AssertionError(f"{tensor} is not a constant")


@pytest.mark.parametrize("name,bits", [("w4a4kv4", 4), ("w4a4kv8-gqa", 8)])
def test_kv_cache_outputs(built, name, bits):
    """The cache leaves prefill at its quantized width: uint8, head_dim/2 bytes per token at 4 bits,
    one row per kept token, kv_heads heads."""
    from quota_export.data import load_bench, load_image
    from quota_export.runtime.ort import OrtRunner

    _, res = built(name)
    m = onnx.load(res.out / "prefill.onnx")
    decl = {o.name: o.type.tensor_type for o in m.graph.output}
    key = decl["present.0.key"]
    assert key.elem_type == onnx.TensorProto.UINT8
    assert key.shape.dim[-1].dim_value == (HEAD_DIM // 2 if bits == 4 else HEAD_DIM)

    runner = OrtRunner(res.out, threads=1)
    s = load_bench(TEST_SPLIT, limit=1)[0]
    ids, pix = runner.encode(load_image(s), s.question)
    emb = runner.embeds(ids, pix)
    out = runner._run("prefill.onnx", {"inputs_embeds": emb, "position_ids": np.arange(emb.shape[1])[None]})
    kv_heads = 4 if name == "w4a4kv4" else 2
    kept = res.manifest["kept_per_layer"]
    T = emb.shape[1]
    for l, k in enumerate(kept):
        q = out[f"present.{l}.key"]
        assert q.dtype == np.uint8
        assert q.shape == (1, kv_heads, T - 144 + k, HEAD_DIM // 2 if bits == 4 else HEAD_DIM)
        assert out[f"present.{l}.key_scale"].dtype == np.float32


def _optimized(res, graph: str, tmp_path: Path) -> onnx.ModelProto:
    """ORT's optimized graph, made with the runner's own session options."""
    import onnxruntime as ort

    from quota_export.runtime.ort import OrtRunner

    so = OrtRunner(res.out, threads=1).session_options
    so.optimized_model_filepath = str(tmp_path / f"opt_{graph}")
    ort.InferenceSession(str(res.out / graph), so, providers=["CPUExecutionProvider"])
    return onnx.load(tmp_path / f"opt_{graph}")


def _ops(m: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in m.graph.node)


def test_ort_fuses_int4_weights_into_matmulnbits(built, tmp_path):
    """Weight-only INT4: ORT turns DQ(int4 W, axis 0, block 32) + MatMul into MatMulNBits, every
    projection included (a pruning layer computes q/k/v once and gathers the kept rows, so each
    weight DQ has one consumer, as ORT's fusion requires). The runner asks for fp32 compute
    (accuracy_level 1): ORT's default (4, int8 activations) breaks parity."""
    _, res = built("w4a16-asym")
    pre = _optimized(res, "prefill.onnx", tmp_path)
    assert _ops(pre)["MatMulNBits"] == 4 * 7, _ops(pre)
    assert _ops(_optimized(res, "decode.onnx", tmp_path))["MatMulNBits"] == 4 * 7
    nb = [n for n in pre.graph.node if n.op_type == "MatMulNBits"]
    assert {_attr(n, "accuracy_level") for n in nb} == {1}


@pytest.mark.slow
def test_ort_optimizations_leave_the_numerics_unchanged(tmp_path, monkeypatch):
    """The runner's session (ORT's full graph optimizations, MatMulNBits at accuracy level 1) and
    an unoptimized session compute the same bits, down to every attention output (fp64
    reductions). Guards against ORT rewrites that change the precision, e.g. MatMulScaleFusion
    turning a scalar score scale into FusedMatMul's float32 alpha. On the shipped default: its
    head_dim 32 makes 1/sqrt(d) inexact in float32 (the fixtures' 16 gives an exact 1/4)."""
    import onnxruntime as ort

    from quota_export.data import load_bench, load_image
    from quota_export.runtime.ort import OrtRunner

    monkeypatch.chdir(ROOT)  # the shipped recipe names its model relative to the repo root
    res = build(load_recipe(ROOT / "recipes" / "default.yaml"), tmp_path / "g", str(TEST_SPLIT), 1, threads=1)
    runner = OrtRunner(res.out, threads=1)
    m = onnx.load(res.out / "prefill.onnx")
    vi = {v.name: v for v in onnx.shape_inference.infer_shapes(m).graph.value_info}
    probes = [n.output[0] for n in m.graph.node if n.name.endswith(("/Softmax", "/PV"))]
    assert len(probes) >= 2 * 4
    m.graph.output.extend(vi[p] for p in probes)
    fast = runner.session_options
    slow = ort.SessionOptions()
    slow.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = load_bench(TEST_SPLIT, limit=1)[0]
    ids, pix = runner.encode(load_image(s.image), s.question)
    emb = runner.embeds(ids, pix)
    feeds = {"inputs_embeds": emb, "position_ids": runner.positions(emb.shape[1])}
    outs = [ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
            for so in (fast, slow)]
    names = [o.name for o in m.graph.output]
    for name, a, b in zip(names, *outs):
        assert np.array_equal(a, b), name


def test_ort_fuses_w4a4_matmuls(built, tmp_path):
    _, res = built("w4a4kv4")
    assert _ops(_optimized(res, "decode.onnx", tmp_path))["MatMulNBits"] > 0


# ---------------------------------------------------------------- run


def test_run_cli_prints_answer(built, capsys):
    from quota_export.data import load_bench, load_image
    from quota_export.runtime.ort import OrtRunner

    _, res = built("w4a4kv4")
    s = load_bench(TEST_SPLIT, limit=1)[0]
    rc = main(["run", "--artifacts", str(res.out), "--image", s.image, "--prompt", s.question])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    want = OrtRunner(res.out, threads=1).generate(load_image(s), s.question).text
    assert want and cap.out == want + "\n"


def test_parity_report_names_the_samples_that_miss():
    from quota_export.verify import ParityReport, misses_line

    rep = ParityReport()
    logits = np.linspace(-1, 1, 16, dtype=np.float32)[None]
    same = [np.array([[0, 2, 3]])]
    rep.add(same, same, [5, 2], [5, 2], logits, logits, "ok-1")
    rep.add(same, [np.array([[0, 1, 3]])], [5, 2], [5, 2], logits, logits + 1e-6, "kept-flip")
    rep.add(same, same, [5, 2], [5, 7], logits, logits + 0.5, "answer-and-sqnr")
    d = rep.as_dict()
    assert [m["id"] for m in d["failing_samples"]] == ["kept-flip", "answer-and-sqnr"]
    assert d["failing_samples"][0]["stages"] == [0] and d["failing_samples"][0]["answer"]
    assert not d["failing_samples"][1]["answer"] and d["failing_samples"][1]["sqnr_db"] < 40
    line = misses_line(d["failing_samples"])
    assert line.startswith("samples missing parity: kept-flip (stage 0 kept indices), answer-and-sqnr (answer, SQNR ")
    assert misses_line(d["failing_samples"] * 4, limit=5).endswith(" and 3 more")


def test_fp32_parity_is_statistical_fp64_parity_exact():
    """fp32 reductions (the tensorrt target) tolerate a minority of rounding-flipped samples; a
    lowering bug that breaks most samples fails both; fp64 (the onnx target) tolerates none."""
    from quota_export.verify import ParityReport, thresholds_for

    logits = np.linspace(-1, 1, 16, dtype=np.float32)[None]
    same = [np.array([[0, 2, 3]])]
    flipped = [np.array([[0, 1, 3]])]

    def report(n_bad):
        rep = ParityReport()
        for i in range(8):
            bad = i < n_bad
            rep.add(same, flipped if bad else same, [5, 2], [5, 2], logits, logits + (0.05 if bad else 0.0), f"s{i}")
        return rep

    one_flip = report(1)  # SQNR ~26 dB and one kept-index flip on 1 of 8 samples
    assert one_flip.failures(thresholds_for("fp32")) == []
    fp64 = one_flip.failures(thresholds_for("fp64"))
    assert any("stage 0 kept-index agreement 87.5% < 100%" in f for f in fp64)
    assert any(f.startswith("logits SQNR min ") for f in fp64)
    assert [m["id"] for m in one_flip.misses(thresholds_for("fp32"))] == ["s0"]  # still listed
    broken = report(5).failures(thresholds_for("fp32"))
    assert any(f.startswith("stage 0 kept-index agreement 37.5% < 75%") for f in broken)
    assert any(f.startswith("logits SQNR median ") and f.endswith("< 40 dB") for f in broken)
