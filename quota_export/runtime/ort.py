"""ONNX Runtime runner over built artifacts, and the greedy generate loop.

    image -> processor -> pixel_values -> vision.onnx -> features [1,N,D]
    prompt ids -> embed.onnx -> embeds; embeds[s:s+N] = features
    prefill.onnx(embeds, position_ids) -> logits, present.*, kept.* (, merge.* with pruning.merge)
    loop: argmax -> embed.onnx -> decode.onnx(embeds, pos, past.* = present.*, merge.* = prefill's) -> logits

position_ids are [1,T] / [1,1] (1-D RoPE), or with manifest `model.mrope` the M-RoPE planes
[P,1,T] / [P,1,1] rebuilt from the visual block's recorded layout (the image size is fixed per build).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quota_export import UserError, memtrace, one_line

GRAPHS = ("vision.onnx", "embed.onnx", "prefill.onnx", "decode.onnx")

# Session config: ORT fuses DequantizeLinear(int4 weight) + MatMul into MatMulNBits, whose default
# accuracy_level 4 re-quantizes the activations to int8 per block inside the kernel. That is not the
# deployed numerics (reference.py keeps fp32 activations between the Q/DQ pairs): on a toy MatMul it
# costs ~45 dB SQNR. Level 1 computes in fp32 and matches the unfused graph exactly.
SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}

# What the runner reads from manifest.json (dotted paths), checked up front for a one-line error.
MANIFEST_FIELDS = (
    "recipe_hash", "schedule", "model.visual_start", "model.n_visual", "model.image_size",
    "model.eos_token_id", "model.image_token_id", "export.max_new_tokens", "graphs",
)


def mrope_positions(T: int, visual_start: int, n_visual: int, layout: dict) -> np.ndarray:
    """M-RoPE position planes [P,1,T] of a prompt with one visual block at [s, s+n):

        text before:  t                     (every plane)
        visual j:     s + layout["visual"][:, j]
        text after:   s + layout["text_after"] + (t - s - n)   (every plane)
    """
    s, n = visual_start, n_visual
    rel = np.asarray(layout["visual"], np.int64)  # [P, n]
    P = rel.shape[0]
    t = np.arange(T, dtype=np.int64)
    pos = np.broadcast_to(t, (P, T)).copy()
    pos[:, s : s + n] = s + rel
    pos[:, s + n :] = s + layout["text_after"] + (t[s + n :] - s - n)
    return pos[:, None, :]


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types onnxruntime raises when a model cannot be loaded.

    onnxruntime's pybind layer registers its own classes (Fail, InvalidProtobuf, InvalidGraph,
    NoSuchFile, ...) that derive from plain `Exception`, with no common base, so we list them
    rather than catch `Exception`; RuntimeError / ValueError cover its Python-side checks.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as st

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(c for c in (getattr(st, n, None) for n in names) if isinstance(c, type)) + (RuntimeError, ValueError)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inside(root: Path, rel, where: str) -> Path:
    """root / rel, refused (one line naming `where`) unless rel is a relative path without '..'
    that stays inside root once symlinks are resolved: a manifest names nothing outside its folder."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel or ".." in rel.split("/"):
        raise UserError(f"{where}: {rel!r} is not a path inside the artifacts folder")
    p = root / rel
    if not p.resolve().is_relative_to(root.resolve()):
        raise UserError(f"{where}: {rel!r} leads outside the artifacts folder (symbolic link)")
    return p


def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


# field -> (check, what it must be): what the runner computes with, so an edited manifest is one line
_FIELD_TYPES = {
    "schedule": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), "a list of stages"),
    "model.visual_start": (_is_int, "an integer >= 0"),
    "model.n_visual": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "model.image_size": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x, 1) for x in v), "[H, W]"),
    "model.eos_token_id": (_is_int, "an integer >= 0"),
    "model.image_token_id": (_is_int, "an integer >= 0"),
    "export.max_new_tokens": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "graphs": (lambda v: isinstance(v, dict), "an object"),
}
_OPTIONAL_TYPES = {
    "export.max_seq": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "model.max_position_embeddings": (lambda v: v is None or _is_int(v, 1), "an integer >= 1"),
    "model.mrope": (lambda v: isinstance(v, dict) and _is_int(v.get("text_after")) and isinstance(v.get("visual"), list),
                    "{visual, text_after}"),
}


def _field(m: dict, dotted: str):
    cur = m
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def _env_threads() -> int:
    v = os.environ.get("OMP_NUM_THREADS", "")
    return int(v) if v.isdigit() else 0


def read_manifest(artifacts: Path, sets_ok: bool = False) -> dict:
    """manifest.json of a build folder, with the fields the runner needs checked."""
    man = artifacts / "manifest.json"
    if not artifacts.exists():
        raise UserError(f"{artifacts}: artifacts folder not found")
    if not artifacts.is_dir():
        raise UserError(f"{artifacts}: not a folder (expected the output folder of `build`)")
    if not man.is_file():
        raise UserError(f"{man}: missing (not a quota_export build output, or the build did not finish)")
    try:
        m = json.loads(man.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{man}: corrupt manifest (invalid JSON: {e.msg}, line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{man}: corrupt manifest (not UTF-8 text)") from None
    except RecursionError:
        raise UserError(f"{man}: corrupt manifest (nested too deeply)") from None
    if not isinstance(m, dict):
        raise UserError(f"{man}: corrupt manifest (expected a JSON object)")
    if "sets" in m and not sets_ok:
        raise UserError(f"{artifacts}: holds one graph set per image size ({', '.join(_set_names(m))}); "
                        f"pass one of them, e.g. {artifacts / _set_dirs(m)[0]}")
    if "sets" in m:
        _set_dirs(m, artifacts)
        return m
    for f in MANIFEST_FIELDS:
        try:
            _field(m, f)
        except KeyError:
            raise UserError(f"{man}: corrupt manifest (field {f!r} missing)") from None
    if not isinstance(m.get("files"), dict) or not all(
            isinstance(v, dict) and _is_int(v.get("bytes")) and isinstance(v.get("sha256"), str) for v in m["files"].values()):
        raise UserError(f"{man}: no checksums of the build's files (field 'files'; written by an older "
                        "quota_export?): rebuild with `python -m quota_export build`")
    for f, (ok, what) in {**_FIELD_TYPES, **_OPTIONAL_TYPES}.items():
        try:
            v = _field(m, f)
        except KeyError:
            continue  # required ones were checked above
        if not ok(v):
            raise UserError(f"{man}: corrupt manifest (field {f!r} must be {what}, got {json.dumps(v)[:60]})")
    for g in GRAPHS:
        info = m["graphs"].get(g)
        if not isinstance(info, dict) or not _is_int(info.get("bytes")) or not isinstance(info.get("sha256"), str):
            raise UserError(f"{man}: corrupt manifest (no size / checksum for {g})")
    return m


def _set_dirs(m: dict, artifacts: Path | None = None) -> list[str]:
    sets = m.get("sets")
    if not isinstance(sets, list) or not sets or not all(
            isinstance(x, dict) and "dir" in x and _FIELD_TYPES["model.image_size"][0](x.get("image_size")) for x in sets):
        raise UserError("corrupt manifest (field 'sets' is not a list of {dir, image_size})")
    for i, x in enumerate(sets):
        if not isinstance(x["dir"], str) or "/" in x["dir"]:
            raise UserError(f"corrupt manifest (sets.{i}.dir {x['dir']!r} must be a folder name inside the artifacts folder)")
        if artifacts is not None:
            inside(artifacts, x["dir"], f"{artifacts / 'manifest.json'}: sets.{i}.dir")
    return [x["dir"] for x in sets]


def _set_names(m: dict) -> list[str]:
    _set_dirs(m)
    return [f"{x['image_size'][1]}x{x['image_size'][0]}" for x in m["sets"]]


def graph_sets(artifacts: str | Path) -> list[tuple[tuple[int, int], Path]]:
    """[(image size (H, W), folder)] of a build: one entry (the folder itself) for a one-size
    build, one per declared size for an `export.image_sizes` build."""
    artifacts = Path(artifacts)
    m = read_manifest(artifacts, sets_ok=True)
    if "sets" not in m:
        return [(tuple(m["model"]["image_size"]), artifacts)]
    dirs = _set_dirs(m, artifacts)
    return [(tuple(x["image_size"]), artifacts / d) for x, d in zip(m["sets"], dirs)]


def set_for_image(artifacts: str | Path, hw: tuple[int, int]) -> Path:
    """The graph-set folder built for an image of size hw = (H, W); a clear error if none was."""
    sets = graph_sets(artifacts)
    if len(sets) == 1:
        return sets[0][1]  # the runner itself says if the size is wrong
    for size, folder in sets:
        if tuple(size) == tuple(hw):
            return folder
    built = ", ".join(f"{w}x{h}" for (h, w), _ in sets)
    raise UserError(f"image is {hw[1]}x{hw[0]}: {artifacts} has graphs for {built} only (export.image_sizes)")


def check_files(folder: Path, manifest: dict) -> None:
    """Every file the manifest lists besides the graphs (processor/, recipe.yaml, calibrated
    weights, external data) is inside the folder and has its recorded size and sha256; processor/
    holds no other file; no entry of the folder is a symbolic link leading out of it."""
    where = folder / "manifest.json"
    files = manifest["files"]
    for rel, want in files.items():
        p = inside(folder, rel, f"{where}: files")
        if not p.is_file():
            raise UserError(f"{p}: missing (the build folder is incomplete)")
        if p.stat().st_size != want["bytes"] or _sha256(p) != want["sha256"]:
            raise UserError(f"{p}: changed after the build (size / checksum differ from the manifest)")
    proc = folder / "processor"
    if proc.is_dir():
        for dirpath, _dirs, names in os.walk(proc):
            for n in names:
                rel = (Path(dirpath) / n).relative_to(folder).as_posix()
                if rel not in files:
                    raise UserError(f"{folder / rel}: not written by the build (the processor would read it); remove it")
    for e in folder.iterdir():
        if e.is_symlink():
            inside(folder, e.name, str(e))


@dataclass
class RunResult:
    tokens: list[int]
    text: str
    prefill_logits: np.ndarray  # [1, V]
    kept: list[np.ndarray]  # per stage [1, k]
    cache_bytes: int  # bytes of the KV cache after prefill (all layers, keys + values + scales)
    merge: list[np.ndarray] = field(default_factory=list)  # per stage [1, k] merged-token counts (pruning.merge)
    embeds: np.ndarray | None = None  # [1, T, D] the prompt's embeddings (vision.onnx + embed.onnx)


class OrtRunner:
    """Sessions over a build folder. `threads` 0 = $OMP_NUM_THREADS if set, else ORT's default;
    `providers`: ONNX Runtime execution providers (runtime/runners.py: the --backend choices)."""

    def __init__(self, artifacts: str | Path, threads: int = 0, providers=("CPUExecutionProvider",),
                 session_bytes: int | None = None):
        """`session_bytes`: hold sessions of at most this many graph bytes (graph + data files) at
        once, each made when first run and the least recently run dropped to make room (a
        real-size model's parity: one decoder graph at a time); None: all four made here."""
        import onnxruntime as ort

        self.dir = Path(artifacts)
        self.providers = list(providers)
        self.manifest = read_manifest(self.dir)
        # every graph is checked against the manifest before ORT sees it: a truncated or swapped
        # file gets a clear message instead of a protobuf error (or worse, wrong answers)
        check_files(self.dir, self.manifest)
        for g in GRAPHS:
            p = inside(self.dir, g, str(self.dir / g))
            if not p.is_file():
                raise UserError(f"{p}: graph missing (rebuild with `python -m quota_export build`)")
            want = self.manifest["graphs"][g]
            size = p.stat().st_size
            if size != want["bytes"]:
                raise UserError(f"{p}: corrupt graph ({size} bytes, the manifest records {want['bytes']}; truncated?)")
            if _sha256(p) != want["sha256"]:
                raise UserError(f"{p}: corrupt graph (checksum differs from the manifest; modified after the build?)")
            data = want.get("external_data")  # a graph over the size threshold (lower/external.py)
            if data is not None and data not in self.manifest["files"]:
                raise UserError(f"{self.dir / 'manifest.json'}: corrupt manifest (no checksum for {g}'s data file {data!r})")
        so = ort.SessionOptions()
        threads = threads or _env_threads()
        if threads > 0:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        for k, v in SESSION_CONFIG.items():
            so.add_session_config_entry(k, v)
        self.session_options = so
        self.sessions = {}
        self.session_bytes = session_bytes
        if session_bytes is None:
            for g in GRAPHS:
                self._open(g)
        self._load_model_info()

    def graph_bytes(self, g: str) -> int:
        """Bytes of graph g's files (the graph and its external data), from the manifest."""
        e = self.manifest["graphs"][g]
        data = e.get("external_data")
        return e["bytes"] + (self.manifest["files"][data]["bytes"] if data else 0)

    def _open(self, g: str):
        """Graph g's session, made now if it is not held (dropping the least recently run ones
        beyond `session_bytes`)."""
        if g in self.sessions:
            self.sessions[g] = self.sessions.pop(g)  # most recently run last
            return self.sessions[g]
        if self.session_bytes is not None:
            while self.sessions and sum(map(self.graph_bytes, self.sessions)) + self.graph_bytes(g) > self.session_bytes:
                self._drop(next(iter(self.sessions)))
        p = self.dir / g
        try:
            src = str(p)
            if self.manifest.get("target") == "tensorrt" and g == "prefill.onnx":
                # ONNX Runtime has no quota::TokenGather: run the same gather in standard ops
                import onnx

                from quota_export.lower.tensorrt_target import inline_token_gathers

                src = inline_token_gathers(onnx.load(str(p))).SerializeToString()
            self.sessions[g] = self._session(g, src, self.session_options)
            memtrace.mark(f"session {g}")
        except ort_errors() as e:
            raise UserError(f"{p}: corrupt or unreadable graph ({one_line(e)})") from None
        return self.sessions[g]

    def _drop(self, g: str) -> None:
        del self.sessions[g]
        from quota_export.weightcache import trim

        trim()

    def _load_model_info(self) -> None:
        """The processor and the manifest's model fields `generate` needs (not the sessions: a
        subclass that runs the graphs elsewhere, e.g. the Triton BLS model, sets only these)."""
        from quota_export.models.loading import load_processor

        proc = self.dir / "processor"
        if not proc.is_dir():
            raise UserError(f"{proc}: missing (the build folder is incomplete)")
        try:
            self.processor = load_processor(proc)
        except (OSError, ValueError, TypeError, KeyError, ImportError, AttributeError) as e:
            raise UserError(f"{proc}: cannot load processor ({one_line(e)})") from None
        stages = len(self.manifest["schedule"])
        pre = self.sessions.get("prefill.onnx")  # None where engines run the graphs (GraphRunner, tensorrt)
        outs = [o.name for o in pre.get_outputs()] if pre is not None else None
        if pre is None and getattr(self, "session_bytes", None) is not None:  # sessions made on use: the outputs the manifest records
            outs = [o["name"] for o in self.manifest["graphs"]["prefill.onnx"].get("outputs", [])]
        kept = sorted(o for o in outs if o.startswith("kept.")) if outs is not None else None
        if kept is not None and kept != sorted(f"kept.{i}" for i in range(stages)):
            raise UserError(f"{self.dir / 'manifest.json'}: corrupt manifest (schedule has {stages} stages, prefill.onnx "
                            f"outputs {len(kept)} kept-index tensors; edited after the build?)")
        m = self.manifest["model"]
        self.visual_start, self.n_visual = m["visual_start"], m["n_visual"]
        self.image_size = tuple(m["image_size"])
        self.eos = m["eos_token_id"]
        self.image_token_id = m["image_token_id"]
        self.mrope = m.get("mrope")  # absent: 1-D positions
        from quota_export.models import REGISTRY

        family = REGISTRY.get(m.get("architecture", ""))  # its processor resizes any image (encode_chat)?
        self.resizes_images = bool(family and family.resizes_images)

    def _session(self, g: str, src, so):
        """One graph's session (`src`: a path, or the serialized graph with gathers inlined)."""
        import onnxruntime as ort

        return ort.InferenceSession(src, so, providers=self.providers)

    def _run(self, g: str, feeds: dict) -> dict:
        """Graph g on feeds -> {output name: array}; the one step `generate` calls for every graph."""
        s = self._open(g)
        try:
            return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
        except ort_errors() as e:
            raise self.refused(g, e) from None

    def refused(self, g: str, e: BaseException) -> UserError:
        """A runtime refusing the inputs of a checked graph: their shapes come from the manifest,
        so it was edited after the build (one line naming the graph)."""
        return UserError(f"{self.dir / g}: the runtime cannot run it on these inputs ({one_line(e)}); "
                         "manifest.json edited after the build?")

    def encode(self, image: np.ndarray, question: str):
        """-> (input_ids [1,T], pixel_values [1,3,H,W]) via the shipped processor, checked (an image of
        another size is resized as the reference resizes it, for fixed-resolution families)."""
        from quota_export.limits import check_text
        from quota_export.models.base import encode_chat

        check_text(question, "prompt")
        enc = encode_chat(self.processor, image, question, tuple(self.image_size), "these graphs take", "np",
                          resize=self.resizes_images)
        ids = enc["input_ids"].astype(np.int64)
        pos = np.flatnonzero(ids[0] == self.image_token_id)
        if len(pos) == self.n_visual and pos[-1] - pos[0] == self.n_visual - 1 and pos[0] > self.visual_start:
            raise UserError(f"prompt too long for the model's chat template: it moves the image to token {pos[0]}, "
                            f"these graphs take it at token {self.visual_start} (shorten the question)")
        if len(pos) != self.n_visual or pos[0] != self.visual_start or pos[-1] - pos[0] != self.n_visual - 1:
            raise UserError(
                f"prompt puts {len(pos)} image tokens at {pos[0] if len(pos) else '-'}; the graphs were built for "
                f"{self.n_visual} at {self.visual_start}"
            )
        return ids, np.asarray(enc["pixel_values"], np.float32)

    def max_seq(self) -> int:
        """Longest sequence (prompt + answer) these graphs run: export.max_seq, and never past the
        model's max_position_embeddings."""
        lim = [self.manifest["export"].get("max_seq"), self.manifest["model"].get("max_position_embeddings")]
        return min([x for x in lim if x] or [1 << 31])

    def positions(self, T: int) -> np.ndarray:
        """Prompt position ids: [1,T] = 0..T-1, or M-RoPE planes [P,1,T] (manifest model.mrope)."""
        if self.mrope is None:
            return np.arange(T, dtype=np.int64)[None]
        return mrope_positions(T, self.visual_start, self.n_visual, self.mrope)

    def step_position(self, p: int) -> np.ndarray:
        """One decode step's position ids: [1,1], or [P,1,1] (p in every plane) with M-RoPE."""
        if self.mrope is None:
            return np.array([[p]], np.int64)
        return np.full((len(self.mrope["visual"]), 1, 1), p, np.int64)

    def embeds(self, ids: np.ndarray, pixel_values: np.ndarray) -> np.ndarray:
        return self.drive(self.embeds_steps(ids, pixel_values))

    def embeds_steps(self, ids: np.ndarray, pixel_values: np.ndarray):
        feats = (yield "vision.onnx", {"pixel_values": pixel_values})["image_features"]
        emb = (yield "embed.onnx", {"input_ids": ids})["inputs_embeds"]
        emb[:, self.visual_start : self.visual_start + self.n_visual] = feats[0]
        return emb

    def drive(self, steps):
        """Run a `*_steps` generator to its end, each graph call it yields, (graph, feeds), through
        `_run` (runtime/graphmajor.py drives many at once instead) -> what it returns."""
        try:
            call = next(steps)
            while True:
                call = steps.send(self._run(*call))
        except StopIteration as done:
            return done.value

    def generate(self, image: np.ndarray, question: str, max_new_tokens: int | None = None) -> RunResult:
        return self.drive(self.generate_steps(image, question, max_new_tokens))

    def generate_steps(self, image: np.ndarray, question: str, max_new_tokens: int | None = None):
        """`generate` as a generator yielding its graph calls (`drive`)."""
        from quota_export.limits import check_max_new_tokens

        max_new = check_max_new_tokens(max_new_tokens or self.manifest["export"]["max_new_tokens"])
        ids, pix = self.encode(image, question)
        T = ids.shape[1]
        limit = self.max_seq()
        if T + max_new > limit:
            raise UserError(f"prompt of {T} tokens + max_new_tokens {max_new} is more than the graphs' sequence limit "
                            f"{limit} (export.max_seq / max_position_embeddings)"
                            + (f": at most {limit - T} new tokens" if T < limit else ": shorten the prompt"))
        emb = yield from self.embeds_steps(ids, pix)
        pos = self.positions(T)
        out = yield "prefill.onnx", {"inputs_embeds": emb, "position_ids": pos}
        kept = [out[f"kept.{i}"] for i in range(len(self.manifest["schedule"]))]
        past = {k.replace("present.", "past.", 1): v for k, v in out.items() if k.startswith("present.")}
        cache_bytes = sum(v.nbytes for v in past.values())
        # merged-token counts: decode rebuilds every step's key bias from prefill's (they never change)
        merge = {k: v for k, v in out.items() if k.startswith("merge.")}
        logits0 = out["logits"]
        logits, toks, p = logits0, [], int(pos.max()) + 1
        for _ in range(max_new):
            t = int(logits.argmax(-1)[0])
            toks.append(t)
            if t == self.eos:
                break
            e = (yield "embed.onnx", {"input_ids": np.array([[t]], np.int64)})["inputs_embeds"]
            o = yield "decode.onnx", {"inputs_embeds": e, "position_ids": self.step_position(p), **past, **merge}
            past = {k.replace("present.", "past.", 1): v for k, v in o.items() if k.startswith("present.")}
            logits, p = o["logits"], p + 1
        text = self.processor.tokenizer.decode(toks, skip_special_tokens=True).strip()
        return RunResult(toks, text, logits0, kept, cache_bytes, [merge[f"merge.{i}"] for i in range(len(merge))], emb)
