"""Real-size checkpoints (issue #21): half-precision weights, graphs over 2 GiB (external data),
and images of any size for fixed-resolution families."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TEST_SPLIT, make_tiny_llava

from quota_export.__main__ import main
from quota_export.build import build
from quota_export.recipe import load_recipe

SAMPLES = 4
ONNX = ("vision.onnx", "embed.onnx", "prefill.onnx", "decode.onnx")


def write_recipe(path: Path, model: Path, name: str = "tiny") -> Path:
    doc = {"name": name, "model": str(model), "quant": {"scheme": "w4a4kv4"},
           "pruning": {"budget": 0.55, "n_visual": 144, "stages": [{"layer": 1, "keep": 72}, {"layer": 3, "keep": 20}]},
           "export": {"max_new_tokens": 4}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def assert_parity(man: dict) -> None:
    p = man["parity"]
    assert p["kept_index_agreement_per_stage"] == [1.0] * len(man["schedule"])
    assert p["answer_agreement"] == 1.0
    assert p["logits_sqnr_db_min"] == "inf" or p["logits_sqnr_db_min"] >= 40.0, p


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- half-precision checkpoints


@pytest.fixture(scope="module")
def half_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny LLaVA saved in bf16 and fp16, and the fp32 upcast of each (same values)."""
    from transformers import LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("half")
    src = make_tiny_llava(root / "fp32")
    out = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for upcast in (False, True):
            d = root / (f"{name}-up32" if upcast else name)
            shutil.copytree(src, d)
            m = LlavaForConditionalGeneration.from_pretrained(src).to(dt)
            (m.float() if upcast else m).save_pretrained(d)
            out[d.name] = d
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_checkpoint_builds_like_its_fp32_upcast(half_models, dtype, tmp_path, capsys):
    """A bf16 / fp16 checkpoint keeps its dtype in memory for the decoder, builds with full parity,
    and gives the same ONNX bytes (hence the same answers) as its fp32 upcast."""
    from quota_export import models

    a = models.load(half_models[dtype])
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert a.layers()[0].self_attn.q_proj.weight.dtype == want  # the decoder is not upcast at load
    assert a.lm_head().weight.dtype == want
    assert {p.dtype for p in a.model.model.vision_tower.parameters()} == {torch.float32}

    res = build(load_recipe(write_recipe(tmp_path / "h.yaml", half_models[dtype])), tmp_path / "h",
                str(TEST_SPLIT), SAMPLES, threads=1)
    up = build(load_recipe(write_recipe(tmp_path / "u.yaml", half_models[f"{dtype}-up32"])), tmp_path / "u",
               str(TEST_SPLIT), SAMPLES, threads=1)
    assert_parity(res.manifest)
    assert {g: sha(res.out / g) for g in ONNX} == {g: sha(up.out / g) for g in ONNX}
    assert res.manifest["parity"] == up.manifest["parity"]

    from quota_export.data import load_bench

    s = load_bench(TEST_SPLIT, limit=1)[0]
    answers = []
    for out in (res.out, up.out):
        assert main(["run", "--artifacts", str(out), "--image", s.image, "--prompt", s.question]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] and answers[0] == answers[1]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl", "llava_next"])
def test_bf16_reference_reads_the_fp32_upcast_values_in_every_family(family, tmp_path, samples):
    """A bf16 checkpoint and its fp32 upcast: the same merged embeddings (vision side in fp32 in
    both) and the same decoder values in the reference, bit for bit; hence the same answers.
    (Logits agree to fp32 rounding only: BLAS may sum in another order for another memory layout.)"""
    from conftest import make_tiny_llava_next, make_tiny_qwen2_vl

    from quota_export import models
    from quota_export.reference import DeployConfig, Deployed

    make = {"llava": make_tiny_llava, "qwen2_vl": make_tiny_qwen2_vl, "llava_next": make_tiny_llava_next,
            "qwen2_5_vl": lambda p: make_tiny_qwen2_vl(p, arch="Qwen2_5_VLForConditionalGeneration")}[family]
    src = make(tmp_path / "src")
    cls = models.load(src).model.__class__
    deps, outs = [], []
    for upcast in (False, True):
        d = tmp_path / f"m{int(upcast)}"
        shutil.copytree(src, d)
        m = cls.from_pretrained(src).to(torch.bfloat16)
        (m.float() if upcast else m).save_pretrained(d)
        a = models.load(d)
        assert a.layers()[0].mlp.down_proj.weight.dtype == (torch.float32 if upcast else torch.bfloat16)
        dep = Deployed(a, DeployConfig())
        pr = a.prompt(*samples[0])
        toks, out = dep.generate(pr, 3)
        deps.append(dep)
        outs.append((dep.embed_prompt(pr), out.logits, toks))
    half, full = deps
    for attr in ("ln1", "ln2", "W", "B"):
        for x, y in zip(getattr(half, attr), getattr(full, attr)):
            x, y = (x, y) if isinstance(x, Mapping) else ({0: x}, {0: y})
            assert all(x[k] is None and y[k] is None or torch.equal(x[k], y[k]) for k in x), attr
    for attr in ("norm", "lm_head", "inv_freq"):
        assert torch.equal(getattr(half, attr), getattr(full, attr)), attr
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5) and outs[0][2] == outs[1][2]


# ---------------------------------------------------------------- images of any size


def resized_bench(tmp: Path, n: int, hw: tuple[int, int]) -> Path:
    """The first n samples of the test split with their images resized to hw = (H, W)."""
    from PIL import Image

    lines = TEST_SPLIT.read_text().splitlines()[:n]
    out = []
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    for i, ln in enumerate(lines):
        d = json.loads(ln)
        p = tmp / "img" / f"{i}.png"
        Image.open(TEST_SPLIT.parent / d["image"]).convert("RGB").resize((hw[1], hw[0])).save(p)
        out.append(json.dumps({**d, "image": str(p)}))
    (tmp / "bench.jsonl").write_text("\n".join(out) + "\n")
    return tmp / "bench.jsonl"


@pytest.fixture(scope="module")
def any_size(tmp_path_factory):
    """(model, recipe, 64x80 bench, build of the recipe with that bench's images through the CLI)."""
    root = tmp_path_factory.mktemp("anysize")
    model = make_tiny_llava(root / "model")
    bench = resized_bench(root / "b", 6, (64, 80))
    recipe = write_recipe(root / "r.yaml", model)
    out = root / "g"
    assert main(["build", "--recipe", str(recipe), "--out", str(out), "--bench", str(bench), "--samples", "4"]) == 0
    return model, recipe, bench, out


def test_build_with_bench_images_of_another_size(any_size):
    _, _, _, out = any_size
    man = json.loads((out / "manifest.json").read_text())
    assert man["model"]["image_size"] == [96, 96]
    assert man["parity"]["data"] == "bench.jsonl" and man["parity"]["samples"] == 4  # taken as they are
    assert_parity(man)


def test_run_answers_an_image_of_another_size_like_the_reference(any_size, capsys):
    """A 64x80 image: the processor resizes it (the shipped processor has do_resize false: by its
    own resize to 96x96, bicubic), in the reference and in the ONNX runner alike."""
    from PIL import Image

    from quota_export.build import load_deployed
    from quota_export.data import load_bench, load_image

    _, recipe, bench, out = any_size
    answers, want = [], []
    _, dep = load_deployed(load_recipe(recipe))
    for s in load_bench(bench, limit=3):
        img = load_image(s)
        assert img.shape == (64, 80, 3)
        assert main(["run", "--artifacts", str(out), "--image", s.image, "--prompt", s.question]) == 0
        answers.append(capsys.readouterr().out)
        pr = dep.adapter.prompt(img, s.question)
        ip = dep.adapter.processor.image_processor
        by_hand = ip(images=Image.fromarray(img), do_resize=True, size={"height": 96, "width": 96}, return_tensors="pt")
        assert torch.equal(pr.pixel_values, by_hand["pixel_values"])
        toks, _ = dep.generate(pr, 4)
        want.append(dep.adapter.processor.tokenizer.decode(toks, skip_special_tokens=True).strip() + "\n")
    assert answers == want and any(a.strip() for a in answers)


@pytest.mark.slow
def test_verify_eval_calibrate_take_images_of_another_size(any_size, tmp_path, capsys):
    model, recipe, bench, out = any_size
    assert main(["verify", "--artifacts", str(out), "--bench", str(bench), "--samples", "3",
                 "--json", str(tmp_path / "v.json")]) == 0  # fmt: skip
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["answer_agreement"] == 1.0 and v["samples"] == 3
    assert main(["eval", "--recipe", str(recipe), "--bench", str(bench), "--samples", "3",
                 "--json", str(tmp_path / "e.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "e.json").read_text())["overall"] is not None
    assert main(["calibrate", "--model", str(model), "--data", str(bench), "--budget", "0.5", "--samples", "2",
                 "-o", str(tmp_path / "c.yaml")]) == 0  # fmt: skip
    assert load_recipe(tmp_path / "c.yaml").pruning.stages


def test_dynamic_resolution_families_name_their_declared_sizes(tiny_qwen2_vl):
    import numpy as np

    from quota_export import UserError, models

    a = models.load(tiny_qwen2_vl)
    assert not a.resizes_images
    with pytest.raises(UserError, match=r"image is 80x64, the model takes 96x96 \(one graph set per declared "
                                         r"image size: list the sizes to serve in export.image_sizes\)"):
        a.prompt(np.zeros((64, 80, 3), np.uint8), "x")


# ---------------------------------------------------------------- graphs over 2 GiB: external data


def test_exported_graph_with_external_data_reads_like_one_without(tmp_path):
    """vision_graph's reader: an export that came with external data (a tower over 2 GiB) gives the
    same graph, converted to the target opset, as the same export in one file."""
    import onnx
    from onnx import version_converter

    from quota_export.lower.decoder import embed_graph
    from quota_export.lower.onnx_target import read_exported

    m = embed_graph(torch.randn(50, 16).numpy(), 20)
    want = version_converter.convert_version(m, 21).SerializeToString(deterministic=True)
    onnx.save_model(m, str(tmp_path / "g.onnx"), save_as_external_data=True, location="g.data", size_threshold=0)
    assert (tmp_path / "g.data").stat().st_size == 50 * 16 * 4
    assert read_exported(tmp_path / "g.onnx", 21).SerializeToString(deterministic=True) == want


@pytest.fixture(scope="module")
def external_build(tmp_path_factory):
    """The tiny LLaVA built twice with the external-data threshold lowered to 4 KB."""
    from quota_export.lower import external

    root = tmp_path_factory.mktemp("external")
    recipe = write_recipe(root / "r.yaml", make_tiny_llava(root / "model"))
    mp = pytest.MonkeyPatch()
    mp.setattr(external, "EXTERNAL_DATA_BYTES", 4096)
    try:
        res = [build(load_recipe(recipe), root / f"g{i}", str(TEST_SPLIT), SAMPLES, threads=1) for i in range(2)]
    finally:
        mp.undo()
    return recipe, res


@pytest.mark.slow
def test_large_graphs_are_written_with_external_data(external_build):
    import onnx

    _, (res, again) = external_build
    assert_parity(res.manifest)  # ONNX Runtime loaded every graph by path, with its data file
    for g in ONNX:
        info = res.manifest["graphs"][g]
        assert info["external_data"] == g + ".data"
        assert (res.out / g).stat().st_size == info["bytes"] and sha(res.out / g) == info["sha256"]
        assert (res.out / (g + ".data")).stat().st_size > 4096
        onnx.checker.check_model(str(res.out / g))
        m = onnx.load(str(res.out / g), load_external_data=False)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    # deterministic: the same recipe and model give the same bytes, data files included
    names = sorted(p.name for p in res.out.iterdir() if p.name.endswith((".onnx", ".data")))
    assert len(names) == 8
    assert {n: sha(res.out / n) for n in names} == {n: sha(again.out / n) for n in names}


def test_external_data_builds_run_and_verify(external_build, capsys, tmp_path):
    from quota_export.data import load_bench, load_image
    from quota_export.runtime.ort import OrtRunner

    recipe, (res, _) = external_build
    s = load_bench(TEST_SPLIT, limit=1)[0]
    assert main(["run", "--artifacts", str(res.out), "--image", s.image, "--prompt", s.question]) == 0
    out = capsys.readouterr().out
    assert out.strip() and out == OrtRunner(res.out, threads=1).generate(load_image(s), s.question).text + "\n"
    assert main(["verify", "--artifacts", str(res.out), "--bench", str(TEST_SPLIT), "--samples", "2",
                 "--json", str(tmp_path / "v.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "v.json").read_text())["answer_agreement"] == 1.0
    from quota_export.__main__ import graph_sizes  # what `build` prints: the data files' bytes too

    data = res.manifest["files"]["prefill.onnx.data"]["bytes"]
    assert f"prefill.onnx {res.manifest['graphs']['prefill.onnx']['bytes'] / 1e6:.2f} MB + {data / 1e6:.2f} MB data" \
        in graph_sizes(res.manifest)


def test_external_data_files_are_hashed_and_checked(external_build, capsys, tmp_path):
    """The manifest hashes every data file; the runner checks them before loading: a changed data
    file (or one whose checksum the manifest lost) is one error line, exit 2."""
    _, (res, _) = external_build
    files = res.manifest["files"]
    for g in ONNX:
        d = res.out / (g + ".data")
        assert files[g + ".data"] == {"bytes": d.stat().st_size, "sha256": sha(d)}
    bad = tmp_path / "bad"
    shutil.copytree(res.out, bad)
    data = bad / "prefill.onnx.data"
    b = bytearray(data.read_bytes())
    b[len(b) // 2] ^= 1  # one bit: same size, other weights
    data.write_bytes(bytes(b))
    s = str(ROOT / "calib_data" / "shapes" / "images" / "test" / "00000.png")
    assert main(["run", "--artifacts", str(bad), "--image", s, "--prompt", "what ?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {data}: changed after the build (size / checksum differ from the manifest)"]

    man = json.loads((bad / "manifest.json").read_text())
    del man["files"]["prefill.onnx.data"]
    (bad / "manifest.json").write_text(json.dumps(man))
    assert main(["run", "--artifacts", str(bad), "--image", s, "--prompt", "what ?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad / 'manifest.json'}: corrupt manifest (no checksum for prefill.onnx's data file "
                   "'prefill.onnx.data')"]
