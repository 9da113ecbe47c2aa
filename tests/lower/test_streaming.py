"""Bounded memory for real-size models (issue #21): graphs written one at a time with their
initializers streamed to disk, and the reference's fp32 weights made per layer on use."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch
from conftest import TEST_SPLIT, make_tiny_llava

from quota_export.build import deployed_at
from quota_export.lower import external, onnx_target
from quota_export.recipe import load_recipe
from quota_export.reference import Deployed

ONNX = ("vision.onnx", "embed.onnx", "prefill.onnx", "decode.onnx")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("stream")
    model = make_tiny_llava(root / "model", seed=3)
    doc = {"name": "s", "model": str(model), "quant": {"scheme": "w4a4kv4"},
           "pruning": {"budget": 0.55, "n_visual": 144, "stages": [{"layer": 1, "keep": 72}, {"layer": 3, "keep": 20}]},
           "export": {"max_new_tokens": 4}}
    (root / "r.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    recipe = load_recipe(root / "r.yaml")
    from quota_export.build import load_model

    adapter, dep = deployed_at(recipe, load_model(recipe))
    probe = adapter.prompt(np.zeros((*adapter.image_size(), 3), np.uint8), "describe image")
    return dep, probe.visual_start


def files(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("threshold", [4096, None])
def test_streamed_graphs_equal_the_graphs_written_whole(tiny, tmp_path, monkeypatch, threshold):
    """lower_into (each graph written as it is made, initializers streamed to the data file) gives
    the same files, byte for byte, as lowering everything in memory and writing it at the end:
    with the threshold lowered (every graph large: graph + data file) and at the default (one file)."""
    dep, start = tiny
    if threshold is not None:
        monkeypatch.setattr(external, "EXTERNAL_DATA_BYTES", threshold)
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    whole.mkdir()
    streamed.mkdir()
    want = {n: external.write_graph(m, whole / n) for n, m in onnx_target.lower(dep, start, 21).items()}
    got = onnx_target.lower_into(streamed, dep, start, 21)
    assert {n: f for n, (f, _) in got.items()} == want
    assert files(streamed) == files(whole)
    names = sorted(files(whole))
    assert names == sorted(ONNX + (tuple(g + ".data" for g in ONNX) if threshold else ()))
    for n, (_, m) in got.items():  # what lower_into hands back: the graph's interface, no weights
        assert len(m.graph.initializer) == 0 and m.graph.input and m.graph.output, n
    if threshold:
        onnx.checker.check_model(str(streamed / "prefill.onnx"))


def test_streaming_writes_each_initializer_when_made(tiny, tmp_path, monkeypatch):
    """Inside `streaming`, a graph's weights leave memory as they are added: after each layer the
    data file has grown and no initializer the graph holds carries its bytes."""
    from quota_export.lower.decoder import DecoderLowering
    from quota_export.ops import graph as graph_mod

    dep, start = tiny
    monkeypatch.setattr(external, "EXTERNAL_DATA_BYTES", 4096)
    seen = []
    real_add = graph_mod.Graph._add

    def add(self, t):
        name = real_add(self, t)
        if self.spill is not None and self.spill.file is not None:
            self.spill.file.flush()
            held = sum(len(x.raw_data) for x in self.inits if x.HasField("raw_data"))
            seen.append((self.spill.path.stat().st_size, held))
        return name

    monkeypatch.setattr(graph_mod.Graph, "_add", add)
    with external.streaming(tmp_path):
        m = DecoderLowering(dep, 144, start).prefill(21)
    sizes = [s for s, _ in seen]
    assert len(seen) > 20 and sizes == sorted(sizes) and sizes[-1] == (tmp_path / "prefill.onnx.data").stat().st_size
    assert max(h for _, h in seen) < 64 * 1024  # only tensors under 1 KiB stay in the graph
    assert external.streamed(m)


def test_reference_weights_are_made_on_use_and_exact_without_cache(tiny, monkeypatch):
    """Deployed keeps no fp32 copy of the decoder beyond its cache budget; with no budget at all
    every weight is remade per use and prefill + decode give the same numbers."""
    from quota_export import weightcache
    from quota_export.data import load_bench, load_image

    dep, _ = tiny
    s = load_bench(TEST_SPLIT, limit=1)[0]
    prompt = dep.adapter.prompt(load_image(s), s.question)
    toks, out = dep.generate(prompt, 4)
    n = f"{dep.spec.module_prefix}.layers.0.mlp.up_proj"
    assert torch.equal(dep.W[0]["mlp.up_proj"], dep.qweights[n].dequant())
    monkeypatch.setattr(weightcache, "CACHE_BYTES", 0)
    bare = Deployed(dep.adapter, dep.cfg, dep.qweights)
    toks2, out2 = bare.generate(prompt, 4)
    assert toks2 == toks and torch.equal(out2.logits, out.logits)
    assert all(torch.equal(a, b) for a, b in zip(out2.kept, out.kept))
    params = {p.data_ptr() for p in dep.adapter.model.parameters()}
    assert bare._cache.used == 0 and all(v.data_ptr() in params for v in bare._cache.kept.values())  # views only
    assert dep._cache.used > 0  # the default budget keeps the tiny model's dequantized weights
    assert torch.equal(bare.lm_head, dep.adapter.lm_head().weight.float())


def test_exported_external_data_streams_to_the_graph_data_file(tmp_path, monkeypatch):
    """A vision export that came with external data (the exporter's own files): inside `streaming`
    its bytes are copied to vision.onnx.data without loading them, giving the same two files as
    reading it whole and writing it (tensors under 1 KiB go back into the graph, as save_model)."""
    from quota_export.lower.decoder import embed_graph
    from quota_export.lower.onnx_target import read_exported

    monkeypatch.setattr(external, "EXTERNAL_DATA_BYTES", 1024)
    src, whole, streamed = (tmp_path / d for d in ("src", "whole", "streamed"))
    for d in (src, whole, streamed):
        d.mkdir()
    m = embed_graph(torch.randn(50, 16).numpy(), 20)
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.arange(7, dtype=np.float32), "small"))
    onnx.save_model(m, str(src / "vision.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    want = external.write_graph(read_exported(src / "vision.onnx", 21), whole / "vision.onnx")
    with external.streaming(streamed):
        got = read_exported(src / "vision.onnx", 21)
        assert external.streamed(got)
        assert external.write_graph(got, streamed / "vision.onnx") == want
    assert files(streamed) == files(whole) and sorted(files(whole)) == ["vision.onnx", "vision.onnx.data"]


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) is Linux's")
def test_page_out_keeps_the_values(tiny):
    """Handing a weight's pages back to the kernel loses nothing: the checkpoint's memory-mapped
    weight reads the same afterwards, and so does an anonymous tensor (no swap: left alone)."""
    from quota_export.weightcache import page_out

    dep, _ = tiny
    w = dep.adapter.layers()[1].mlp.up_proj.weight.detach()
    anon = torch.randn(1 << 20)
    before = (w.clone(), anon.clone())
    assert page_out(w) and page_out(anon)
    assert torch.equal(w, before[0]) and torch.equal(anon, before[1])


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_streamed_initializers_leave_memory(tmp_path, monkeypatch):
    """A graph built inside `streaming` keeps copies of its initializers without their bytes:
    clearing a protobuf field does not free its bytes (upb arenas), so keeping the cleared tensor
    would hold every byte already written. 256 MiB of weights streamed grow RSS by far less."""
    from quota_export.memtrace import status
    from quota_export.ops.graph import Graph

    monkeypatch.setattr(external, "EXTERNAL_DATA_BYTES", 0)
    with external.streaming(tmp_path):
        g = Graph("big")
        before = status()["VmRSS"]
        for i in range(16):
            g.init(f"w{i}", np.full((1 << 22,), i, np.float32))  # 16 MiB each
        grown = status()["VmRSS"] - before
    assert grown < 64 << 20, f"RSS grew {grown >> 20} MiB while streaming 256 MiB"
    assert all(not t.HasField("raw_data") for t in g.inits)
    assert (tmp_path / "big.onnx.data").stat().st_size == 16 << 22 << 2


def test_light_version_conversion_gives_the_same_graph(tiny, tmp_path):
    """convert_light (the vision export's opset conversion without the tensors' bytes) gives the
    bytes of converting the whole graph."""
    import warnings

    from onnx import version_converter

    dep, _ = tiny
    mod, x = dep.adapter.vision_module().eval(), torch.zeros(*dep.adapter.pixel_shape())
    path = tmp_path / "v.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mod, (x,), str(path), input_names=["pixel_values"], output_names=["image_features"],
                          opset_version=20, dynamo=False, do_constant_folding=True)
    want = version_converter.convert_version(onnx.load(str(path)), 21).SerializeToString(deterministic=True)
    got = onnx_target.convert_light(onnx.load(str(path)), 21)
    assert got.SerializeToString(deterministic=True) == want
    assert sum(t.HasField("raw_data") for t in got.graph.initializer) > 10


def test_build_exports_the_vision_tower_before_quantizing(tiny_llava, tmp_path, monkeypatch):
    """build: the vision tower's export (the torch exporter's copies of it) runs before the decoder
    is quantized, so the exporter and the quantized weights are never in memory together."""
    from test_build import write_recipe

    from quota_export import build as build_mod

    order = []
    real_dep, real_vision = build_mod.deployed_at, onnx_target.vision_graph

    def dep(*a, **k):
        order.append("quantize")
        return real_dep(*a, **k)

    def vision(*a, **k):
        order.append("vision")
        return real_vision(*a, **k)

    monkeypatch.setattr(build_mod, "deployed_at", dep)
    monkeypatch.setattr(onnx_target, "vision_graph", vision)
    r = write_recipe(tmp_path / "r.yaml", "order", tiny_llava, {"scheme": "w4a4kv4"}, [{"layer": 1, "keep": 72}], 0.7)
    res = build_mod.build(load_recipe(r), tmp_path / "g", str(TEST_SPLIT), 1, threads=1)
    assert order == ["vision", "quantize"] and res.manifest["parity"]["answer_agreement"] == 1.0
