"""Polygraphy runners (runtime/runners.py): the ORT runner gives today's outputs bit for bit, the
reference runner gives the reference's, `--backend` refuses what cannot run here with exit 3, and the
CUDA / TensorRT runners skip with the reason on a machine without a GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import S_WEIGHTED, TEST_SPLIT

from quota_export.__main__ import main
from quota_export.runtime import runners
from quota_export.runtime.ort import GRAPHS, OrtRunner


@pytest.fixture(scope="module")
def built(tiny_llava, tmp_path_factory):
    """A W4A4KV4 build with merging (counts into decode) of the tiny model: (recipe, BuildResult)."""
    from test_build import write_recipe

    from quota_export.build import build
    from quota_export.recipe import load_recipe

    root = tmp_path_factory.mktemp("runners")
    r = write_recipe(root / "r.yaml", "runners", tiny_llava, {"scheme": "w4a4kv4"},
                     [{"layer": 1, "keep": 72}, {"layer": 3, "keep": 20, **S_WEIGHTED}], 0.55,
                     pruning={"merge": "proportional"})
    return r, build(load_recipe(r), root / "g", str(TEST_SPLIT), 3, threads=1)


@pytest.fixture(scope="module")
def items():
    from quota_export.data import load_bench, load_image

    return [(load_image(s), s.question) for s in load_bench(TEST_SPLIT, limit=3)]


def test_polygraphy_ort_runner_is_bit_identical(built, items):
    """Every graph output (KV cache, kept indices, merge counts, logits) and every answer of the
    polygraphy OnnxrtRunner path equals OrtRunner's bit for bit."""
    _, res = built
    ort_, poly = OrtRunner(res.out, threads=1), runners.GraphRunner(res.out, "ort-cpu", threads=1)
    from polygraphy.backend.onnxrt import OnnxrtRunner

    assert all(isinstance(r, OnnxrtRunner) and r.is_active for r in poly.runners.values())
    for image, q in items:
        ids, pix = ort_.encode(image, q)
        feeds = {"vision.onnx": {"pixel_values": pix}, "embed.onnx": {"input_ids": ids}}
        emb = ort_.embeds(ids, pix)
        feeds["prefill.onnx"] = {"inputs_embeds": emb, "position_ids": ort_.positions(emb.shape[1])}
        for g, f in feeds.items():
            a, b = ort_._run(g, f), poly._run(g, f)
            assert list(a) == list(b)
            for k in a:
                assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), (g, k)
        pre = ort_._run("prefill.onnx", feeds["prefill.onnx"])
        dec = {"inputs_embeds": emb[:, -1:], "position_ids": ort_.step_position(emb.shape[1]),
               **{k.replace("present.", "past.", 1): v for k, v in pre.items() if k.startswith("present.")},
               **{k: v for k, v in pre.items() if k.startswith("merge.")}}
        a, b = ort_._run("decode.onnx", dec), poly._run("decode.onnx", dec)
        assert all(a[k].tobytes() == b[k].tobytes() for k in a)
        ra, rb = ort_.generate(image, q), poly.generate(image, q)
        assert ra.tokens == rb.tokens and ra.text == rb.text and ra.prefill_logits.tobytes() == rb.prefill_logits.tobytes()
        assert all(np.array_equal(x, y) for x, y in zip(ra.kept + ra.merge, rb.kept + rb.merge))
    poly.close()
    assert not any(r.is_active for r in poly.runners.values())


def test_reference_runner_equals_the_reference(built, items):
    """ReferenceRunner's outputs are Deployed.generate's (tokens, prefill logits, kept indices) from
    the feed's embeddings, and its `inputs_embeds` is Deployed.embed_prompt's."""
    from quota_export.build import deployed_at, load_model
    from quota_export.recipe import load_recipe

    r, res = built
    recipe = load_recipe(r)
    _, dep = deployed_at(recipe, load_model(recipe), fp64=True)
    graphs = runners.GraphRunner(res.out, threads=1)
    ref = runners.ReferenceRunner(dep, 4)
    loader = runners.SampleLoader(graphs, items)
    with ref:
        for i, (image, q) in enumerate(items):
            feed = loader[i]
            out = ref.infer(feed)
            prompt = dep.adapter.prompt(image, q)
            toks, want = dep.generate(prompt, 4, embeds=torch.from_numpy(feed["inputs_embeds"]))
            assert out["tokens"].tolist() == toks and len(toks) > 0
            assert np.array_equal(out["logits"], want.logits.numpy())
            assert [out[f"kept.{s}"].tolist() for s in range(len(want.kept))] == [k.tolist() for k in want.kept]
            assert np.array_equal(out["inputs_embeds"], dep.embed_prompt(prompt).numpy())
    with pytest.raises(IndexError):
        loader[len(items)]


def test_compare_goes_through_the_comparator(built, items):
    """verify.compare (polygraphy Comparator, streaming) gives the report of running the two sides by
    hand: same kept indices, answers and SQNR per sample."""
    from quota_export.build import deployed_at, load_model
    from quota_export.recipe import load_recipe
    from quota_export.verify import compare, sqnr_db

    r, res = built
    recipe = load_recipe(r)
    _, dep = deployed_at(recipe, load_model(recipe), fp64=True)
    graphs = runners.GraphRunner(res.out, threads=1)
    rep = compare(graphs, dep, items, 4, progress=False, ids=["a", "b", "c"])
    assert rep.samples == 3 and [x[0] for x in rep.records] == ["a", "b", "c"]
    for (image, q), sq in zip(items, rep.sqnr):
        run = graphs.generate(image, q, 4)
        ids, pix = graphs.encode(image, q)
        toks, want = dep.generate(dep.adapter.prompt(image, q), 4, embeds=torch.from_numpy(graphs.embeds(ids, pix)))
        assert sq == sqnr_db(want.logits.numpy(), run.prefill_logits)
    assert rep.failures() == []  # the tiny build holds exact parity


def test_compare_releasing_the_graphs_first_gives_the_same_report(built, items):
    """release=True (build, verify): every sample through the graphs, their sessions dropped, then
    the reference: the same report as side by side, and the runner holds no session after."""
    from quota_export.build import deployed_at, load_model
    from quota_export.recipe import load_recipe
    from quota_export.verify import compare

    r, res = built
    recipe = load_recipe(r)
    _, dep = deployed_at(recipe, load_model(recipe), fp64=True)
    want = compare(runners.GraphRunner(res.out, threads=1), dep, items, 4, progress=False, ids=["a", "b", "c"])
    graphs = runners.GraphRunner(res.out, threads=1)
    got = compare(graphs, dep, items, 4, progress=False, ids=["a", "b", "c"], release=True)
    assert got.as_dict() == want.as_dict() and got.records == want.records
    assert graphs.sessions == {} and not graphs.runners
    # verify: the reference made (the model loaded) only once the graphs' sessions are gone
    graphs = runners.GraphRunner(res.out, threads=1, session_bytes=runners.parity_session_bytes(graphs.manifest))
    held = []

    def reference():
        held.append(dict(graphs.sessions))
        return dep

    got = compare(graphs, reference, items, 4, progress=False, ids=["a", "b", "c"], release=True)
    assert got.as_dict() == want.as_dict() and held == [{}]


def test_sessions_made_on_use_within_a_byte_budget(built, items):
    """session_bytes: sessions made when first run, the least recently run dropped to stay within
    the budget; the answers are those of a runner holding all four."""
    _, res = built
    full = runners.GraphRunner(res.out, threads=1)
    sizes = {g: full.graph_bytes(g) for g in runners.GRAPHS}
    budget = sizes["embed.onnx"] + max(v for g, v in sizes.items() if g != "embed.onnx")
    lazy = runners.GraphRunner(res.out, threads=1, session_bytes=budget)
    assert lazy.sessions == {}
    held = []
    real = lazy._open

    def spy(g):
        s = real(g)
        held.append(sum(map(lazy.graph_bytes, lazy.sessions)))
        return s

    lazy._open = spy
    for image, q in items:
        a, b = full.generate(image, q, 4), lazy.generate(image, q, 4)
        assert a.tokens == b.tokens and np.array_equal(a.prefill_logits, b.prefill_logits)
        assert all(np.array_equal(x, y) for x, y in zip(a.kept, b.kept))
    assert held and max(held) <= budget and len(lazy.sessions) < 4


def test_parity_session_bytes():
    def man(**sizes):
        return {"graphs": {g: {"bytes": b} for g, b in sizes.items()}, "files": {}}

    assert runners.parity_session_bytes(man(**{"vision.onnx": 10, "embed.onnx": 5, "prefill.onnx": 20})) == 25
    big = man(**{"vision.onnx": 1 << 30, "embed.onnx": 1 << 29, "prefill.onnx": 3 << 30, "decode.onnx": 3 << 30})
    assert runners.parity_session_bytes(big) == (1 << 29) + (3 << 30)


def test_cli_backend_ort_cpu_runs(built, items, capsys, monkeypatch):
    """`run` answers as OrtRunner.generate does, holding the embedding session and one other."""
    _, res = built
    from quota_export.data import load_bench

    held = []
    real = runners.GraphRunner._session

    def spy(self, g, src, so):
        held.append(set(self.sessions) | {g})
        return real(self, g, src, so)

    monkeypatch.setattr(runners.GraphRunner, "_session", spy)
    s = load_bench(TEST_SPLIT, limit=1)[0]
    assert main(["run", "--artifacts", str(res.out), "--image", s.image, "--prompt", s.question,
                 "--backend", "ort-cpu"]) == 0
    assert len(held) == 4 and all(len(h - {"embed.onnx"}) <= 1 for h in held)
    monkeypatch.undo()
    want = OrtRunner(res.out, threads=1).generate(*items[0]).text
    assert capsys.readouterr().out == want + "\n"
    out = res.out.parent / "v.json"
    assert main(["verify", "--artifacts", str(res.out), "--bench", str(TEST_SPLIT), "--samples", "2",
                 "--backend", "ort-cpu", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["backend"] == "ort-cpu" and d["samples"] == 2 and d["answer_agreement"] == 1.0


@pytest.mark.parametrize("backend", ["ort-cuda", "tensorrt"])
@pytest.mark.parametrize("cmd", ["run", "verify"])
def test_cli_backend_refused_here_with_exit_3(built, backend, cmd, capsys):
    """Where the backend cannot run, `run` / `verify` print one `error: --backend ...: <reason>`
    line and exit 3, as `build --target tensorrt` does without TensorRT."""
    reason = runners.backend_unavailable_reason(backend)
    if reason is None:
        pytest.skip(f"{backend} can run on this machine: the refusal cannot be seen here")
    _, res = built
    from quota_export.data import load_bench

    args = {"run": ["--image", load_bench(TEST_SPLIT, limit=1)[0].image, "--prompt", "q"],
            "verify": ["--bench", str(TEST_SPLIT), "--samples", "1"]}[cmd]
    rc = main([cmd, "--artifacts", str(res.out), "--backend", backend, *args])
    err = capsys.readouterr().err
    assert rc == 3
    assert err.splitlines() == [f"error: --backend {backend}: {reason}"]


def test_cli_bad_artifacts_is_exit_2_before_the_backend(tmp_path, capsys):
    """Bad input is said first (exit 2), whichever backend is asked for."""
    for backend in runners.BACKENDS:
        rc = main(["verify", "--artifacts", str(tmp_path / "none"), "--bench", str(TEST_SPLIT), "--backend", backend])
        assert rc == 2 and capsys.readouterr().err == f"error: {tmp_path / 'none'}: artifacts folder not found\n"


def test_unavailable_reasons_name_the_missing_part():
    import onnxruntime as ort

    assert runners.backend_unavailable_reason("ort-cpu") is None
    cuda = runners.backend_unavailable_reason("ort-cuda")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "no CUDA execution provider" in cuda and "onnxruntime-gpu" in cuda
    gpu = runners.gpu_unavailable_reason()
    try:
        import tensorrt  # noqa: F401

        assert runners.backend_unavailable_reason("tensorrt") == gpu
    except ImportError:
        assert "TensorRT is not installed" in runners.backend_unavailable_reason("tensorrt")
    with pytest.raises(runners.BackendUnavailable):
        runners.GraphRunner("nowhere", "tensorrt" if runners.backend_unavailable_reason("tensorrt") else "bogus")


def test_engine_loader_is_strongly_typed_without_tf32(tmp_path):
    """The TensorRT build chain is polygraphy's: NetworkFromOnnxPath(strongly_typed) ->
    EngineFromNetwork(config=CreateConfig(tf32=False, one profile)); built lazily, so it exists here."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath

    from quota_export.runtime.tensorrt import engine_loader

    inputs = [{"name": "inputs_embeds", "dtype": "float", "shape": [1, "seq", 64]},
              {"name": "position_ids", "dtype": "int64", "shape": [1, "seq"]}]
    loader = engine_loader(tmp_path / "prefill.onnx", inputs, min_seq=150, max_seq=256)
    assert isinstance(loader, EngineFromNetwork)
    net = loader._network
    assert isinstance(net, NetworkFromOnnxPath) and net.strongly_typed is True
    cfg = loader._config
    assert isinstance(cfg, CreateConfig) and cfg.tf32 is False
    (profile,) = cfg.profiles
    assert tuple(profile["inputs_embeds"].min) == (1, 150, 64) and tuple(profile["inputs_embeds"].max) == (1, 256, 64)
    assert profile["position_ids"].opt[1] == profile["inputs_embeds"].opt[1]


CUDA_REASON = runners.backend_unavailable_reason("ort-cuda")
TRT_REASON = runners.backend_unavailable_reason("tensorrt")


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_REASON is not None, reason=f"ort-cuda: {CUDA_REASON}")
def test_ort_cuda_runner_matches_reference(built, items):
    """UNVERIFIED here: the CUDA EP path holds the build's parity thresholds."""
    from quota_export.build import deployed_at, load_model
    from quota_export.recipe import load_recipe
    from quota_export.verify import compare

    r, res = built
    recipe = load_recipe(r)
    _, dep = deployed_at(recipe, load_model(recipe), fp64=True)
    rep = compare(runners.GraphRunner(res.out, "ort-cuda"), dep, items, 4, progress=False)
    assert rep.failures() == []


@pytest.mark.gpu
@pytest.mark.skipif(TRT_REASON is not None, reason=f"tensorrt: {TRT_REASON}")
def test_tensorrt_runner_engine_parity(tmp_path):
    """UNVERIFIED here: `build --target tensorrt` of a tiny model on a machine with TensorRT writes
    the engines, records engine parity (TrtRunner) holding the fp32 thresholds; verify agrees."""
    from conftest import make_tiny_llava
    from test_build import write_recipe

    model = make_tiny_llava(tmp_path / "m", hidden=128, seed=3)  # INT4 blocks of 64 (TensorRT)
    r = write_recipe(tmp_path / "r.yaml", "trt", model, {"scheme": "w4a4kv4", "weights": {"bits": 4, "group_size": 64}},
                     [{"layer": 1, "keep": 72}, {"layer": 3, "keep": 20, **S_WEIGHTED}], 0.55)
    rc = main(["build", "--recipe", str(r), "--target", "tensorrt", "--out",
               str(tmp_path / "g"), "--bench", str(TEST_SPLIT), "--samples", "4"])
    man = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert rc == 0 and man["engines"]["built"] and man["engines"]["verified"], man.get("engines")
    assert sorted(man["engines"]["files"]) == sorted(g.replace(".onnx", ".engine") for g in GRAPHS)
    assert main(["verify", "--artifacts", str(tmp_path / "g"), "--bench", str(TEST_SPLIT), "--samples", "4",
                 "--backend", "tensorrt"]) == 0


@pytest.mark.parametrize("past_bytes", [1 << 30, 1])
def test_graph_major_generation_equals_generate(built, items, past_bytes):
    """graphmajor.generate_all (parity): every sample's tokens, logits, kept indices, merge counts
    and embeddings equal `generate`'s bit for bit; with sessions made on use it holds the
    embedding session and one other, each made once per round (one round when the caches fit
    past_bytes, one per sample when they do not)."""
    from quota_export.runtime.graphmajor import generate_all

    _, res = built
    full = runners.GraphRunner(res.out, threads=1)
    want = [full.generate(image, q, 4) for image, q in items]
    lazy = runners.GraphRunner(res.out, threads=1, session_bytes=runners.parity_session_bytes(full.manifest))
    made, held = [], []
    real = lazy._session

    def spy(g, src, so):
        made.append(g)
        held.append(set(lazy.sessions) | {g})
        return real(g, src, so)

    lazy._session = spy
    got = generate_all(lazy, items, 4, past_bytes=past_bytes)
    for a, b in zip(want, got):
        assert a.tokens == b.tokens and a.prefill_logits.tobytes() == b.prefill_logits.tobytes()
        assert all(x.tobytes() == y.tobytes() for x, y in zip(a.kept, b.kept))
        assert all(x.tobytes() == y.tobytes() for x, y in zip(a.merge, b.merge)) and len(a.merge) == len(b.merge) > 0
        assert a.embeds.tobytes() == b.embeds.tobytes()
    assert all(len(h - {"embed.onnx"}) <= 1 for h in held)
    rounds = 1 if past_bytes > 1 else len(items)
    assert made.count("vision.onnx") == made.count("embed.onnx") == 1
    assert made.count("prefill.onnx") == made.count("decode.onnx") == rounds
