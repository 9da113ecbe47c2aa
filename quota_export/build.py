"""`build`: recipe + model -> graphs/<name>/ (vision, embed, prefill, decode, manifest), verified.

    check --out (recover an interrupted build there) -> load model (recipe checked against it)
      -> parity data -> lower -> save into a hidden sibling folder .<name>.quota-build-<pid>-<rand>
      -> load in ONNX Runtime -> parity vs reference.py -> publish (publish.py: an older build there
      is swapped out only at that moment; files it did not write stay)

Nothing is written to the output folder unless every step succeeds: on any error (bad input, a
parity failure, Ctrl-C, SIGTERM) the temporary folder, and any parent folders the build created, are
removed and an older build at the same place is left untouched. docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quota_export import UserError, memtrace, publish, versions

PARITY_SAMPLES = 8
STEPS = 5


class ParityError(UserError):
    """The built graphs disagree with the PyTorch reference (an exporter bug, not bad input)."""

    exit_code = 1


def _check_quant_fits(recipe, adapter, spec) -> None:
    """Recipe-vs-model checks of group sizes (one line naming the recipe field)."""
    rq = recipe.resolved_quant()
    kv = rq.kv_cache
    if kv.bits < 16 and kv.group_size is not None and spec.head_dim % kv.group_size:
        raise UserError(f"quant.kv_cache.group_size: {kv.group_size} does not divide head_dim {spec.head_dim}")
    if kv.bits == 4 and spec.head_dim % 2:
        raise UserError(f"quant.kv_cache.bits: a 4-bit cache packs two values per byte; head_dim {spec.head_dim} is odd")
    w = rq.weights
    if w.bits >= 16:
        return
    mods = dict(adapter.model.named_modules())
    for name in recipe.resolved_quant().weights.quantized(list(mods)):
        weight = getattr(mods[name], "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        if w.granularity == "group" and weight.shape[1] % w.group_size:
            raise UserError(
                f"quant.weights.group_size: {w.group_size} does not divide the {weight.shape[1]} input "
                f"features of {name}"
            )
        try:
            w.scale_bits_for(weight.shape[1], rq.activations.bits)
        except ValueError as e:
            raise UserError(f"quant.weights.accumulation: {name}: {e}") from None


def load_model(recipe):
    """The recipe's checkpoint as an adapter, with the recipe checked against it."""
    from quota_export import models

    path = recipe.model_path()
    if not path.exists():
        raise UserError(f"model: checkpoint folder not found: {path}")
    adapter = models.load(path)
    spec = adapter.decoder_spec()
    declared = recipe.export.image_sizes is None  # else the sizes are checked one by one (image_sizes)
    recipe.check_against(spec.num_layers, adapter.n_visual() if declared else None, adapter.module_names())
    _check_quant_fits(recipe, adapter, spec)
    limit = max_positions(adapter)
    if limit is not None and recipe.export.max_seq > limit:
        raise UserError(f"export.max_seq: {recipe.export.max_seq} is more than the model's max_position_embeddings {limit}")
    return adapter


def max_positions(adapter) -> int | None:
    """The decoder's max_position_embeddings (config.json), None if the config does not say."""
    cfg = adapter.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    v = getattr(cfg, "max_position_embeddings", None)
    return v if isinstance(v, int) and v > 0 else None


def image_sizes(recipe, adapter) -> list[tuple[int, int]]:
    """The sizes to build for: export.image_sizes, or the model's one declared size."""
    if recipe.export.image_sizes is None:
        return [tuple(adapter.image_size())]
    return [(int(h), int(w)) for h, w in recipe.export.image_sizes]


def size_dir(hw) -> str:
    """Folder of the graph set for image size hw = (H, W): named W x H, as image sizes are said."""
    return f"{hw[1]}x{hw[0]}"


def deployed_at(recipe, adapter, size=None, qweights=None, fp64: bool | None = None):
    """(adapter at `size`, Deployed with the stage keeps for that size's visual-token count)."""
    from quota_export.reference import DeployConfig, Deployed

    if size is not None:
        adapter = adapter.with_image_size(*size)
    n = adapter.n_visual()
    cfg = DeployConfig.from_recipe(recipe, n)
    if fp64 is not None:
        cfg = dataclasses.replace(cfg, fp64=fp64)
    if qweights is None and cfg.weights.algorithm == "gptq":
        from quota_export.qweights import load_qweights

        qweights = load_qweights(recipe, adapter, cfg)  # the calibrated file beside the recipe
    return adapter, Deployed(adapter, cfg, qweights)


def load_deployed(recipe):
    """Recipe -> (adapter, Deployed) with the recipe checked against the model, at the model's
    declared image size (or the first of export.image_sizes)."""
    adapter = load_model(recipe)
    size = image_sizes(recipe, adapter)[0] if recipe.export.image_sizes is not None else None
    return deployed_at(recipe, adapter, size)


@dataclass
class ParityData:
    items: list  # (image uint8 HxWx3, question)
    source: str  # for people: "test.jsonl" / "random images"
    example: tuple[str, str] | None = None  # (image path, question) of the first sample, for the `run` hint
    ids: list[str] | None = None  # one per item: names the samples a parity report flags


def load_items(path, n: int, image_size: tuple[int, int], resize: bool = False, any_size: bool = False) -> ParityData:
    """n task-balanced samples of a benchmark JSONL, images checked against the model's input size
    (or, with `resize`, resized to it: parity of a graph set built for another size; with
    `any_size`, a fixed-resolution family, passed as they are: the processor resizes them)."""
    from quota_export.data import load_bench, load_image

    samples = load_bench(path, limit=n)
    items = []
    h, w = image_size
    resized = False
    for s in samples:
        img = load_image(s)
        if img.shape[:2] != (h, w) and not any_size:
            if not resize:
                raise UserError(f"{s.image}: image is {img.shape[1]}x{img.shape[0]}, the model takes {w}x{h}")
            from PIL import Image

            img = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC))
            resized = True
        items.append((img, s.question))
    source = Path(path).name + (f" resized to {w}x{h}" if resized else "")
    return ParityData(items, source, None if resized else (samples[0].image, samples[0].question),
                      [s.id for s in samples])


def parity_items(adapter, recipe, n: int, bench: str | None = None, resize: bool = False) -> ParityData:
    """(image, question) pairs: from a benchmark JSONL if given (or the recipe's calibration data),
    else seeded random images with a fixed question."""
    if n < 1:
        raise UserError(f"samples: need at least 1 parity sample, got {n}")
    src = bench or (recipe.calibration.data if recipe.calibration else None)
    if bench or (src and Path(src).is_file()):
        return load_items(src, n, adapter.image_size(), resize, adapter.resizes_images)
    h, w = adapter.image_size()
    rng = np.random.default_rng(0)
    items = [(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "describe image") for _ in range(n)]
    why = f"calibration data {src} not found" if src else "no --bench given"
    return ParityData(items, f"random {w}x{h} images ({why})", ids=[f"random-{i}" for i in range(n)])


def mrope_layout(probe) -> dict:
    """What the runner needs to rebuild M-RoPE position planes [P,1,T] of any prompt of this build
    (runtime.ort.mrope_positions): the visual block's positions relative to visual_start, and
    where the text after it resumes (relative to visual_start). Checked against the probe prompt."""
    from quota_export.runtime.ort import mrope_positions

    pos = probe.position_ids[:, 0].numpy()
    s, n = probe.visual_start, probe.n_visual
    layout = {"visual": (pos[:, s : s + n] - s).tolist(), "text_after": int(pos[0, s + n] - s)}
    again = mrope_positions(pos.shape[1], s, n, layout)
    if not np.array_equal(again[:, 0], pos):
        raise UserError(f"{probe.__class__.__name__}: the model's M-RoPE positions do not follow the "
                        "text / visual block / text layout this exporter supports")
    return layout


def io_spec(model) -> dict:
    from onnx import TensorProto

    def vi(v):
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": TensorProto.DataType.Name(t.elem_type).lower(), "shape": dims}

    return {"inputs": [vi(v) for v in model.graph.input], "outputs": [vi(v) for v in model.graph.output]}


# ---------------------------------------------------------------- the output folder


def _write_graph(m, path: Path) -> dict:
    from quota_export.lower import external

    return external.write_graph(m, path)  # over the threshold: <graph>.data beside it


def _quant_summary(cfg) -> str:
    parts = [f"W{cfg.weights.bits}" if cfg.weights.bits < 16 else "W fp32", f"A{cfg.a_bits}" if cfg.a_bits < 16 else "A fp32",
             f"KV{cfg.kv_bits}" if cfg.kv_bits < 16 else "KV fp32"]
    return " ".join(parts)


# ---------------------------------------------------------------- build


@dataclass
class BuildResult:
    out: Path
    manifest: dict
    seconds: float
    example: tuple[str, str] | None  # (image path, question) of a parity sample, for the `run` hint


def build(recipe, out: Path | None = None, bench: str | None = None, samples: int = PARITY_SAMPLES,
          progress: bool = False, target: str = "onnx", log=None, threads: int = 0) -> BuildResult:
    """Build and verify; returns the output folder and the manifest written there.

    One image size (the model's declared one, or a single export.image_sizes entry): the graph
    set is the folder itself. Several sizes: one complete set per size in <out>/<H>x<W>/, and a
    top-level manifest.json listing them (`sets`); the runner picks the set by the image's size.

    `log(str)` receives one line per step (the CLI prints them to stderr); `progress` shows a
    per-sample bar during the parity check; `threads` is passed to the ONNX Runtime sessions."""
    import onnx

    say = log or (lambda _msg: None)
    t0 = time.monotonic()
    out = Path(out) if out else Path("graphs") / (recipe.name if target == "onnx" else f"{recipe.name}-{target}")
    if target not in ("onnx", "tensorrt"):
        raise UserError(f"target {target!r}: known targets are onnx, tensorrt")
    max_opset = onnx.defs.onnx_opset_version()
    if recipe.export.opset > max_opset:
        raise UserError(f"export.opset: {recipe.export.opset} is newer than the installed onnx supports ({max_opset})")
    if Path.cwd().resolve().is_relative_to(Path(os.path.abspath(out)).resolve()):
        # the swap renames the output folder: never the folder we run in (--out .) or one above it
        raise UserError(f"{out}: output folder is the current folder or contains it (choose another --out)")
    publish.claim(out, say)
    tmp, created = publish.make_tmp(out)
    ok = False
    try:
        say(f"[1/{STEPS}] loading {recipe.model_path()}")
        base = load_model(recipe)
        memtrace.mark("load")
        sizes = image_sizes(recipe, base)
        sets, qweights, example = [], None, None
        for size in sizes:
            adapter = base.with_image_size(*size) if recipe.export.image_sizes else base
            dep = _deployed_once(recipe, adapter, qweights)
            folder = tmp if len(sizes) == 1 else tmp / size_dir(size)
            folder.mkdir(exist_ok=True)
            man, ex = _build_set(recipe, adapter, dep, folder, out, target, bench, samples, progress, threads, say,
                                 tag="" if len(sizes) == 1 else f"{size[1]}x{size[0]}: ")
            qweights = dep().qweights  # quantized once, shared by every size
            sets.append((size, man))
            example = example or ex
        if len(sizes) == 1:
            manifest = sets[0][1]
        else:
            manifest = {
                "recipe": recipe.name,
                "recipe_hash": recipe.content_hash(),
                "target": target,
                "sets": [{"image_size": list(sz), "dir": size_dir(sz), "n_visual": m["model"]["n_visual"],
                          "schedule": m["schedule"], "parity": m["parity"]} for sz, m in sets],
                "versions": versions(runtime=True),
            }
            (tmp / "recipe.yaml").write_text(recipe.to_yaml())
            manifest["files"] = {"recipe.yaml": publish.file_entry(tmp / "recipe.yaml")}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

        say(f"[5/{STEPS}] publishing {out}")
        try:
            publish.publish(tmp, out)
        except OSError as e:
            raise UserError(f"{out}: cannot move the build into place ({e.strerror or e})") from None
        ok = True
        return BuildResult(out, manifest, time.monotonic() - t0, example)
    finally:
        publish.discard(tmp)
        if not ok:
            publish.remove_empty(created)


def _deployed_once(recipe, adapter, qweights):
    """A function making the Deployed of `adapter` (quantizing it, unless `qweights` are given) on its
    first call and returning the same one after: the ONNX target exports the vision tower before it
    is called, so the exporter and the quantized weights are not in memory together."""
    made = []

    def dep():
        if not made:
            made.append(deployed_at(recipe, adapter, None, qweights)[1])
            memtrace.mark("quantize")
        return made[0]

    return dep


def _build_set(recipe, adapter, dep, folder: Path, out: Path, target: str, bench, samples: int, progress: bool,
               threads: int, say, tag: str = ""):
    """Lower, write and check one graph set (one image size) into `folder`; -> (manifest, example).
    `dep`: a function making the Deployed (`_deployed_once`)."""
    from quota_export.prune.schedule import kept_per_layer
    from quota_export.reference import DeployConfig
    from quota_export.verify import compare, misses_line, parity_kind, thresholds_for

    spec, cfg = adapter.decoder_spec(), DeployConfig.from_recipe(recipe, adapter.n_visual())  # dep().cfg, before it is made
    stages = ", ".join(f"layer {s.layer} keeps {s.keep}" for s in cfg.stages) or "no pruning"
    say(f"      {tag}{adapter.architecture}: {spec.num_layers} decoder layers, {adapter.n_visual()} visual tokens "
        f"per image; {_quant_summary(cfg)}; {stages}")
    resize = recipe.export.image_sizes is not None
    data = parity_items(adapter, recipe, samples, bench, resize)  # a bad --bench fails before the slow part
    probe = adapter.prompt(np.zeros((*adapter.image_size(), 3), np.uint8), "describe image")
    need = probe.input_ids.shape[1] + recipe.export.max_new_tokens
    if need > recipe.export.max_seq:  # the runner refuses longer sequences (export.max_seq)
        raise UserError(f"export.max_seq: {recipe.export.max_seq} is less than {tag}a prompt of {probe.input_ids.shape[1]} "
                        f"tokens (the image and a two-word question) + export.max_new_tokens "
                        f"{recipe.export.max_new_tokens}; raise it")

    say(f"[2/{STEPS}] {tag}lowering to ONNX (opset {recipe.export.opset}, target {target})")
    if target == "tensorrt":
        from quota_export.lower import tensorrt_target

        graphs = tensorrt_target.lower(dep(), probe.visual_start, recipe.export.opset)
        bad = tensorrt_target.violations(graphs)
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise UserError(f"target tensorrt: the graphs break TensorRT's operator rules: {bad[0]}{more}")
        say("      TensorRT operator rules: all graphs pass (lower/trt_check.py); fp32 reductions (TensorRT has no FP64)")
    from quota_export.models import quiet_hf

    try:
        if target == "tensorrt":
            say(f"[3/{STEPS}] {tag}writing graphs")
            files = {name: _write_graph(m, folder / name) for name, m in graphs.items()}
        else:  # each graph written as it is made, its weights streamed to disk (lower/external.py)
            from quota_export.lower import onnx_target

            written = onnx_target.lower_into(folder, dep, probe.visual_start, recipe.export.opset, adapter)
            files = {name: f for name, (f, _) in written.items()}
            graphs = {name: m for name, (_, m) in written.items()}
            say(f"[3/{STEPS}] {tag}graphs written")
        with quiet_hf():
            adapter.processor.save_pretrained(folder / "processor")
        (folder / "recipe.yaml").write_text(recipe.to_yaml())
        if recipe.weights_path() is not None:  # calibrated weights travel with the recipe copy
            shutil.copyfile(recipe.weights_path(), folder / recipe.weights_path().name)
        # every other file the set holds (processor/, recipe.yaml, weights, external data): hashed too
        hashed = publish.hash_tree(folder, skip=(*graphs, publish.MARKER))
    except OSError as e:  # e.g. disk full
        raise UserError(f"{out}: cannot write the build ({e.strerror or e})") from None
    manifest = {
        "recipe": recipe.name,
        "recipe_hash": recipe.content_hash(),
        "target": target,
        "reductions": "fp64" if cfg.fp64 and target != "tensorrt" else "fp32",  # the graphs' (TensorRT: fp32)
        "model": {
            "path": str(recipe.model),
            "architecture": adapter.architecture,
            "visual_start": probe.visual_start,
            "n_visual": probe.n_visual,
            "image_size": list(adapter.image_size()),
            "eos_token_id": spec.eos_token_id,
            "image_token_id": adapter.image_token_id(),
            "num_layers": spec.num_layers,
            "max_position_embeddings": max_positions(adapter),
            **({"mrope": mrope_layout(probe)} if probe.position_ids is not None else {}),
        },
        "schedule": [{"layer": s.layer, "keep": s.keep, "select": s.select} for s in cfg.stages],
        "kept_per_layer": kept_per_layer([s.layer for s in cfg.stages], [s.keep for s in cfg.stages],
                                         probe.n_visual, spec.num_layers),
        "kv_cache": {"bits": cfg.kv_bits, "group_size": cfg.kv_group or spec.head_dim},
        "export": {
            "opset": recipe.export.opset,
            "max_new_tokens": recipe.export.max_new_tokens,
            "max_seq": recipe.export.max_seq,
        },
        "graphs": {n: {**files[n], **io_spec(m)} for n, m in graphs.items()},
        "files": hashed,
        "versions": versions(runtime=True),
    }
    del graphs  # the sessions read the files: no graph is held twice during parity
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    say(f"[4/{STEPS}] {tag}parity ({parity_kind(manifest['reductions'])}) vs the PyTorch reference (fp64 reductions) on "
        f"{len(data.items)} samples of {data.source}")
    from quota_export.runtime.runners import GraphRunner, parity_session_bytes

    runner = GraphRunner(folder, "ort-cpu", threads=threads, session_bytes=parity_session_bytes(manifest))
    # Always against the exact reference (fp64 reductions, every result rounded once to fp32):
    # graphs with fp32 reductions differ from it only by their own roundings, whereas a reference
    # in fp32 would add torch's (another summation order) - on the shipped default that halves
    # the median logits SQNR (verify.THRESHOLDS_FP32).
    rep = compare(runner, dep().with_reductions(True), data.items, recipe.export.max_new_tokens, progress=progress,
                  ids=data.ids, release=True)  # the sessions go before the reference runs
    manifest["parity"] = {"data": data.source, "reference_reductions": "fp64", **rep.as_dict()}
    fails = rep.failures(thresholds_for(manifest["reductions"]))
    if fails:
        raise ParityError(
            f"parity check failed: {tag}{'; '.join(fails)} ({misses_line(rep.misses())}); nothing written to {out} "
            "(the graphs disagree with the PyTorch reference: please report this with the recipe)"
        )
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    if target == "tensorrt":
        manifest["engines"] = _engines(folder, manifest, dep(), data, recipe.export.max_new_tokens, say, tag)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest, data.example


def _engines(folder: Path, manifest: dict, dep, data, max_new_tokens: int, say, tag: str) -> dict:
    """TensorRT engines where TensorRT and a GPU exist, with their parity against the reference on
    the build's samples (TrtRunner, runtime/runners.py); otherwise the one-line reason why not.

    UNVERIFIED: no development machine has TensorRT or a GPU, so this path has not run (docs/gpu.md)."""
    from quota_export.lower import tensorrt_target
    from quota_export.verify import compare, misses_line, thresholds_for

    reason = tensorrt_target.engine_unavailable_reason()
    if reason:
        return {"built": False, "verified": False, "reason": reason}
    from quota_export.runtime.runners import GraphRunner
    from quota_export.runtime.tensorrt import build_engines

    eng = {"built": True, "verified": False, "files": build_engines(folder, manifest, say)}
    manifest["engines"] = eng  # the runner checks the engine files against it
    say(f"      {tag}engine parity (TensorRT, {len(eng['files'])} engines) on {len(data.items)} samples of {data.source}")
    runner = GraphRunner(folder, "tensorrt")
    try:
        rep = compare(runner, dep, data.items, max_new_tokens, progress=False, ids=data.ids)
    finally:
        runner.close()
    eng["parity"] = {"data": data.source, "reference_reductions": "fp64", **rep.as_dict()}
    fails = rep.failures(thresholds_for(manifest["reductions"]))
    if fails:
        raise ParityError(f"engine parity failed: {tag}{'; '.join(fails)} ({misses_line(rep.misses())}); nothing "
                          "written (the TensorRT engines disagree with the PyTorch reference)")
    eng["verified"] = True
    return eng


def next_steps(res: BuildResult) -> list[str]:
    """Copy-paste commands for a first run of the built graphs."""
    man = res.manifest
    h, w = man["model"]["image_size"] if "sets" not in man else man["sets"][0]["image_size"]
    if res.example:
        img, q = res.example
        rel = os.path.relpath(img)
        image, prompt = shlex.quote(img if rel.startswith("..") else rel), shlex.quote(q)
    else:
        image, prompt = f"<{w}x{h} image>", "'<question>'"
    a = shlex.quote(str(res.out))
    return [
        f"try it:  python -m quota_export run --artifacts {a} --image {image} --prompt {prompt}",
        f"check:   python -m quota_export verify --artifacts {a} --bench <benchmark.jsonl>",
    ]
