"""Polygraphy runners: the built graphs on ONNX Runtime (CPU or CUDA EP) or as TensorRT engines, the
PyTorch reference as a runner of its own, and the parity comparison through polygraphy's Comparator.

Two levels:

- per graph, polygraphy's own runners: `OnnxrtRunner` over a session with this project's session
  options (`runtime/ort.py::SESSION_CONFIG`), or `TrtRunner` over a built `.engine`
  (`runtime/tensorrt.py`). `GraphRunner` is `OrtRunner`'s generate loop (processor, embeddings,
  prefill, greedy decode) with every graph run through them: `--backend ort-cpu|ort-cuda|tensorrt`.
- per sample, two `BaseRunner`s with the same inputs and outputs, compared by `Comparator.run`:
  `PipelineRunner` (a `GraphRunner`) and `ReferenceRunner` (reference.py's `Deployed`). Inputs:
  `image` uint8 [H,W,3], `question` (UTF-8 bytes, uint8 [n]), `inputs_embeds` [1,T,D] (what the
  graphs' vision + embed computed: the reference decodes from the same embeddings, so float noise
  of the unquantized vision tower cannot decide a near-tie in a top-k). Outputs: `inputs_embeds`
  (each side's own: the vision check), `logits` (prefill), `kept.{s}`, `tokens` (the greedy answer).
  verify.py's own checks (kept-index agreement, answers, SQNR) read the results.

What runs here (CPU only): `ort-cpu`. `ort-cuda` needs onnxruntime-gpu and an NVIDIA GPU,
`tensorrt` needs TensorRT and a GPU; both are refused with the reason (`backend_unavailable_reason`)
and have not run on the development machines (docs/gpu.md).
"""

from __future__ import annotations

import ctypes
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner

from quota_export import UserError, memtrace
from quota_export.runtime.ort import GRAPHS, OrtRunner

BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt")

# CUDA EP options for the exact path: ORT's CUDA EP multiplies fp32 matrices in TF32 by default
# (`use_tf32` 1), which rounds the inputs to a 10-bit mantissa; the exact integer-activation matmuls
# (quant.weights.accumulation: exact) need true fp32 products, as the engines need TF32 off.
CUDA_PROVIDER_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}
PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    # ops the CUDA EP has no kernel for (e.g. some fp64 reductions) fall back to the CPU EP
    "ort-cuda": [("CUDAExecutionProvider", CUDA_PROVIDER_OPTIONS), "CPUExecutionProvider"],
}


class BackendUnavailable(UserError):
    """The backend cannot run on this machine (no GPU, no onnxruntime-gpu, no TensorRT): exit 3."""

    exit_code = 3


def quiet_polygraphy(warnings: bool = False) -> None:
    """Polygraphy logs every activation and inference at INFO, to stdout (where `run` prints its
    answer): keep its errors only, or its warnings too (`warnings`: engine builds)."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False  # else it asks for the optional `colored` module on first use
    G_LOGGER.module_severity = G_LOGGER.WARNING if warnings else G_LOGGER.ERROR


def gpu_unavailable_reason() -> str | None:
    """None when the NVIDIA driver sees at least one GPU, else the one-line reason. Asks the driver
    (libcuda) itself: torch here is a CPU build, so torch.cuda would say no on a GPU machine too."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found): this machine has no NVIDIA GPU"
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "the NVIDIA driver reports no usable GPU (cuInit / cuDeviceGetCount)"
    return None


def backend_unavailable_reason(backend: str) -> str | None:
    """None when `backend` can run here, else one line saying why not."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})"
    if backend == "ort-cpu":
        return None
    if backend == "ort-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return ("this onnxruntime has no CUDA execution provider (install onnxruntime-gpu in place of "
                    "onnxruntime on a machine with an NVIDIA GPU: docs/gpu.md)")
        return gpu_unavailable_reason()
    from quota_export.lower.tensorrt_target import engine_unavailable_reason

    return engine_unavailable_reason()


def require_backend(backend: str) -> None:
    reason = backend_unavailable_reason(backend)
    if reason:
        raise BackendUnavailable(f"--backend {backend}: {reason}")


class GraphRunner(OrtRunner):
    """OrtRunner's generate loop with every graph run by a polygraphy runner of `backend`.

    ort-cpu / ort-cuda: `OnnxrtRunner` over the session OrtRunner opens (same session options,
    providers of the backend). tensorrt: `TrtRunner` over `<graph>.engine` beside each graph, built
    by `build --target tensorrt` (the graphs are still checked against the manifest first)."""

    def __init__(self, artifacts: str | Path, backend: str = "ort-cpu", threads: int = 0,
                 session_bytes: int | None = None):
        require_backend(backend)
        quiet_polygraphy()
        self.backend = backend
        self.runners = OrderedDict()
        if backend == "tensorrt":
            session_bytes = None  # engines, not sessions
        super().__init__(artifacts, threads, providers=PROVIDERS.get(backend, PROVIDERS["ort-cpu"]),
                         session_bytes=session_bytes)
        if session_bytes is None:
            self.runners = OrderedDict((g, self._runner(g)) for g in GRAPHS)
            for r in self.runners.values():
                r.activate()

    def _drop(self, g: str) -> None:
        r = self.runners.pop(g, None)
        if r is not None and r.is_active:
            r.deactivate()
        super()._drop(g)

    def _session(self, g: str, src, so):
        if self.backend == "tensorrt":
            return None  # the engines run the graphs
        sess = super()._session(g, src, so)
        if self.backend == "ort-cuda" and "CUDAExecutionProvider" not in sess.get_providers():
            raise BackendUnavailable(f"--backend ort-cuda: {self.dir / g}: ONNX Runtime could not create the CUDA "
                                     f"execution provider (session providers: {', '.join(sess.get_providers())})")
        return sess

    def _runner(self, g: str):
        if self.backend == "tensorrt":
            from quota_export.runtime.tensorrt import engine_runner

            return engine_runner(self.dir, g, self.manifest)
        from polygraphy.backend.onnxrt import OnnxrtRunner

        return OnnxrtRunner(self.sessions[g], name=f"{self.backend}:{g}")

    def _run(self, g: str, feeds: dict) -> dict:
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER

        from quota_export.runtime.ort import ort_errors

        try:  # polygraphy prints a refusal before raising it: the CLI's one line says it instead
            with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1):
                if self.session_bytes is not None:  # sessions made on use (session_bytes)
                    self._open(g)
                if g not in self.runners:
                    self.runners[g] = self._runner(g)
                    self.runners[g].activate()
                return dict(self.runners[g].infer(feeds))
        except (PolygraphyException, *ort_errors()) as e:
            raise self.refused(g, e) from None

    def close(self) -> None:
        """Deactivate the graph runners (polygraphy warns about runners left active)."""
        for r in getattr(self, "runners", {}).values():
            if r.is_active:
                r.deactivate()

    def release(self) -> None:
        """Close and drop every session (their memory goes back; this runner is spent)."""
        self.close()
        self.runners, self.sessions = OrderedDict(), {}

    def __del__(self):
        self.close()


# ---------------------------------------------------------------- sample level: graphs vs reference
def _question(feed) -> str:
    return bytes(np.asarray(feed["question"], np.uint8)).decode("utf-8")


def sample_feed(image: np.ndarray, question: str, inputs_embeds: np.ndarray) -> OrderedDict:
    return OrderedDict(image=np.ascontiguousarray(image, np.uint8),
                       question=np.frombuffer(question.encode("utf-8"), np.uint8).copy(),
                       inputs_embeds=np.asarray(inputs_embeds, np.float32))


def _sample_metadata():
    from polygraphy.common import TensorMetadata

    return (TensorMetadata().add("image", np.uint8, (None, None, 3)).add("question", np.uint8, (None,))
            .add("inputs_embeds", np.float32, (1, None, None)))


class _SampleRunner:
    """Shared polygraphy plumbing of the two sample-level runners (inputs: `sample_feed`)."""

    def activate_impl(self):
        pass

    def deactivate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return _sample_metadata()


class PipelineRunner(_SampleRunner, BaseRunner):
    """A whole sample through the built graphs (`GraphRunner.generate`, as `run` answers it)."""

    def __init__(self, graphs: OrtRunner, max_new_tokens: int, name: str | None = None):
        super().__init__(name=name or f"graphs-{getattr(graphs, 'backend', 'ort-cpu')}", prefix="graphs")
        self.graphs, self.max_new_tokens = graphs, max_new_tokens

    def infer_impl(self, feed_dict):
        t0 = time.perf_counter()
        image, q = feed_dict["image"], _question(feed_dict)
        out = pipeline_outputs(self.graphs.generate(image, q, self.max_new_tokens))
        self.inference_time = time.perf_counter() - t0
        return out


def pipeline_outputs(res) -> OrderedDict:
    """PipelineRunner's outputs of one sample's `RunResult`."""
    out = OrderedDict(inputs_embeds=res.embeds, logits=res.prefill_logits)
    out.update((f"kept.{i}", k) for i, k in enumerate(res.kept))
    out["tokens"] = np.asarray(res.tokens, np.int64)
    return out


class ReferenceRunner(_SampleRunner, BaseRunner):
    """reference.py's `Deployed` as a polygraphy runner: decodes from the feed's `inputs_embeds`
    (the graphs' own embeddings) and returns its own embeddings of the image for the vision check."""

    def __init__(self, deployed, max_new_tokens: int, name: str = "reference"):
        super().__init__(name=name, prefix="reference")
        self.deployed, self.max_new_tokens = deployed, max_new_tokens

    def infer_impl(self, feed_dict):
        import torch

        t0 = time.perf_counter()
        prompt = self.deployed.adapter.prompt(feed_dict["image"], _question(feed_dict))
        with torch.no_grad():
            ref_emb = self.deployed.embed_prompt(prompt)
            toks, res = self.deployed.generate(prompt, self.max_new_tokens,
                                               embeds=torch.from_numpy(np.asarray(feed_dict["inputs_embeds"])))
        out = OrderedDict(inputs_embeds=ref_emb.numpy(), logits=res.logits.numpy())
        out.update((f"kept.{i}", k.numpy()) for i, k in enumerate(res.kept))
        out["tokens"] = np.asarray(toks, np.int64)
        self.inference_time = time.perf_counter() - t0
        return out


class SampleLoader:
    """Polygraphy data loader of (image, question) items: each feed carries the embeddings the
    graphs under test compute for it (vision.onnx + embed.onnx)."""

    def __init__(self, graphs: GraphRunner, items):
        self.graphs, self.items = graphs, list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if i >= len(self.items):
            raise IndexError(i)
        image, question = self.items[i]
        ids, pix = self.graphs.encode(image, question)
        return sample_feed(image, question, self.graphs.embeds(ids, pix))


def parity_session_bytes(manifest: dict) -> int:
    """The `session_bytes` of a parity check (build, verify) and of `run`: room for the embedding
    graph and the largest other one. Sessions are made when first run, and the parity runs the samples one
    graph at a time (graphmajor.generate_all), so the prefill and decode sessions (each ~1.8x its
    file bytes in ONNX Runtime) are never held together."""
    sizes = {}
    for g, e in manifest["graphs"].items():
        data = e.get("external_data")  # a data file the manifest lost is the runner's error to name
        sizes[g] = e["bytes"] + (manifest["files"].get(data, {}).get("bytes", 0) if data else 0)
    return sizes.get("embed.onnx", 0) + max(v for g, v in sizes.items() if g != "embed.onnx")


def run_side_by_side(graphs: GraphRunner, deployed, items, max_new_tokens: int, release: bool = False,
                     progress: bool = False):
    """Yields (reference outputs, graph outputs) per item: `Comparator.run` in streaming mode (one
    sample at a time, both runners active), the reference first. `release` (build, verify): the
    graphs run every item first and their sessions are released (`graphs` is spent) before the
    reference runs, so the two never hold memory at once; the same outputs. There the graphs run
    one at a time over all items (graphmajor.generate_all), and `deployed` may be a function
    making the reference, called once they are released (verify loads the model only then).
    `progress`: with `release`, a bar for each of the two passes (on a real-size model each
    takes minutes; the graphs' bar counts the samples answered)."""
    from polygraphy.comparator import Comparator
    from tqdm import tqdm

    quiet_polygraphy()
    if release:
        from quota_export.runtime.graphmajor import generate_all
        from quota_export.weightcache import trim

        items = list(items)
        bar = dict(disable=not progress, unit="sample", total=len(items))
        with tqdm(desc="parity: graphs", **bar) as answered:
            res = generate_all(graphs, items, max_new_tokens, done=lambda: answered.update())  # one graph at a time
        done = [(sample_feed(image, q, r.embeds), pipeline_outputs(r)) for (image, q), r in zip(items, res)]
        memtrace.mark("parity: graphs ran")
        graphs.release()
        trim()
        memtrace.mark("parity: sessions released")
        ref = ReferenceRunner(deployed() if callable(deployed) else deployed, max_new_tokens)
        with ref:
            for feed, out in tqdm(done, desc="parity: reference", **bar):
                yield ref.infer(feed), out
        memtrace.mark("parity: reference ran")
        return
    runners = [ReferenceRunner(deployed, max_new_tokens), PipelineRunner(graphs, max_new_tokens)]
    for results in Comparator.run(runners, data_loader=SampleLoader(graphs, items), streaming=True):
        (_, ref), (_, out) = results.items()
        yield ref[0], out[0]
