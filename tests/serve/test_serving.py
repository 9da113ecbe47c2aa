"""Serving: the Triton model repository (configs vs graphs, the BLS model's answers) and a small
load on the PyTriton server (`serve`), both against `run`'s answers on the shipped test split.

The BLS model runs here against a stand-in for `triton_python_backend_utils` whose BLS requests
execute the repository's models the way tritonserver's ONNX Runtime backend would: inputs checked
against each config.pbtxt (names, types, dims), session options from the config (graph
optimization level), no session config entries (the backend sets none). The full tritonserver
with its onnxruntime backend is not installable here; PyTriton's server is, and the last test
runs it.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TEST_SPLIT

from quota_export.__main__ import main

pytestmark = pytest.mark.slow  # real Triton servers start and stop (~80 s together)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The shipped model built with the default recipe (the graphs `run` answers with)."""
    out = tmp_path_factory.mktemp("serving") / "default"
    assert main(["build", "--recipe", str(ROOT / "recipes" / "default.yaml"), "--out", str(out),
                 "--bench", str(TEST_SPLIT), "--samples", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def samples():
    from quota_export.data import load_bench

    return load_bench(TEST_SPLIT, limit=12)


@pytest.fixture(scope="module")
def run_answers(built, samples):
    """What `run` answers (OrtRunner.generate, the runner `run` calls) for each sample."""
    from quota_export.data import load_image
    from quota_export.runtime.ort import OrtRunner

    r = OrtRunner(built)
    return [(res.text, res.tokens) for res in (r.generate(load_image(s), s.question) for s in samples)]


@pytest.fixture(scope="module")
def repo(built, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repo") / "models"
    assert main(["export-triton", "--artifacts", str(built), "--out", str(out), "--instances", "2"]) == 0
    return out


def test_run_answers_are_not_degenerate(run_answers):
    assert len({a for a, _ in run_answers}) >= 3, run_answers  # equal answers below would prove little


# ---------------------------------------------------------------- model repository


def _parse(path: Path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient (the serve extra)")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_config_parser_is_strict(tmp_path):
    from google.protobuf import text_format

    p = tmp_path / "config.pbtxt"
    p.write_text('name: "x"\nbackend: "onnxruntime"\nmax_batch_sise: 0\n')
    with pytest.raises(text_format.ParseError, match="max_batch_sise"):
        _parse(p)


def test_repository_configs_match_graphs(repo, built):
    import onnx

    from quota_export.serve.protocol import INPUTS, MODEL_NAME, OUTPUTS
    from quota_export.serve.repository import ORT_GRAPH_LEVEL

    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient (the serve extra)")

    models = sorted(p.name for p in repo.iterdir())
    assert models == sorted([MODEL_NAME] + [f"{MODEL_NAME}_{g}" for g in ("vision", "embed", "prefill", "decode")])
    for g in ("vision", "embed", "prefill", "decode"):
        d = repo / f"{MODEL_NAME}_{g}"
        cfg = _parse(d / "config.pbtxt")
        assert cfg.name == d.name and cfg.backend == "onnxruntime" and cfg.max_batch_size == 0
        assert cfg.optimization.graph.level == ORT_GRAPH_LEVEL
        assert [(i.kind, i.count) for i in cfg.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 2)]
        assert (d / "1" / "model.onnx").read_bytes() == (built / f"{g}.onnx").read_bytes()
        graph = onnx.load(str(d / "1" / "model.onnx")).graph
        for declared, actual in ((cfg.input, graph.input), (cfg.output, graph.output)):
            assert [t.name for t in declared] == [t.name for t in actual], g
            for t, a in zip(declared, actual):
                np_type = onnx.helper.tensor_dtype_to_np_dtype(a.type.tensor_type.elem_type)
                assert mc.DataType.Name(t.data_type) == "TYPE_" + {"float32": "FP32"}.get(np_type.name, np_type.name.upper()), (g, t.name)
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in a.type.tensor_type.shape.dim]
                assert list(t.dims) == dims, (g, t.name)
    entry = _parse(repo / MODEL_NAME / "config.pbtxt")
    assert entry.backend == "python" and entry.max_batch_size == 0
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims), t.optional) for t in entry.input] == \
        [(n, tt, list(s), o) for n, _, tt, s, o in INPUTS]
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in entry.output] == \
        [(n, tt, list(s)) for n, _, tt, s, _ in OUTPUTS]
    assert (repo / MODEL_NAME / "1" / "model.py").is_file()
    assert (repo / MODEL_NAME / "1" / "build" / "manifest.json").read_bytes() == (built / "manifest.json").read_bytes()


def test_export_refuses_existing_folder(built, repo, capsys):
    before = sorted(p.name for p in repo.iterdir())
    assert main(["export-triton", "--artifacts", str(built), "--out", str(repo)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(repo) in err[-1] and "already exists" in err[-1]
    assert sorted(p.name for p in repo.iterdir()) == before


class FakeBackend:
    """`triton_python_backend_utils` for the BLS model, over the repository's ONNX models."""

    def __init__(self, repo: Path):
        import onnxruntime as ort
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc

        self.calls: dict[str, int] = {}
        self.models = {}
        levels = {-1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, 1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 0: ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        for d in repo.iterdir():
            cfg = text_format.Parse((d / "config.pbtxt").read_text(), mc.ModelConfig())
            if cfg.backend != "onnxruntime":
                continue
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.graph_optimization_level = levels[cfg.optimization.graph.level]
            sess = ort.InferenceSession(str(d / "1" / "model.onnx"), so, providers=["CPUExecutionProvider"])
            self.models[d.name] = (cfg, sess)
        backend = self

        class Tensor:
            def __init__(self, name, array):
                self._name, self._a = name, np.asarray(array)

            def name(self):
                return self._name

            def as_numpy(self):
                return self._a

        class TritonError:
            def __init__(self, msg):
                self._m = msg

            def message(self):
                return self._m

        class TritonModelException(Exception):
            pass

        class InferenceResponse:
            def __init__(self, output_tensors, error=None):
                self._out, self._err = list(output_tensors), error

            def has_error(self):
                return self._err is not None

            def error(self):
                return self._err

            def output_tensors(self):
                return self._out

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs, **kw):
                self.model_name, self.outputs, self.inputs = model_name, list(requested_output_names), list(inputs)

            def exec(self):
                return backend.execute(self)

        self.Tensor, self.TritonError, self.TritonModelException = Tensor, TritonError, TritonModelException
        self.InferenceResponse, self.InferenceRequest = InferenceResponse, InferenceRequest

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return next((t for t in request.inputs if t.name() == name), None)

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return next((t for t in response.output_tensors() if t.name() == name), None)

    def execute(self, req):
        """As tritonserver would: the request's tensors must match the model's config."""
        from tritonclient.grpc import model_config_pb2 as mc

        if req.model_name not in self.models:
            return self.InferenceResponse([], self.TritonError(f"model {req.model_name} not found"))
        cfg, sess = self.models[req.model_name]
        declared = {t.name: t for t in cfg.input}
        feeds = {}
        for t in req.inputs:
            spec = declared.get(t.name())
            a = t.as_numpy()
            want = mc.DataType.Name(spec.data_type) if spec else None
            have = "TYPE_" + {"float32": "FP32"}.get(a.dtype.name, a.dtype.name.upper())
            if spec is None or want != have or len(spec.dims) != a.ndim or any(
                    d != -1 and d != s for d, s in zip(spec.dims, a.shape)):
                return self.InferenceResponse([], self.TritonError(f"{req.model_name}: input {t.name()} {have} "
                                                                   f"{list(a.shape)} does not match the config"))
            feeds[t.name()] = a
        missing = set(declared) - set(feeds)
        if missing:
            return self.InferenceResponse([], self.TritonError(f"{req.model_name}: missing inputs {sorted(missing)}"))
        self.calls[req.model_name] = self.calls.get(req.model_name, 0) + 1
        names = [o.name for o in sess.get_outputs()]
        res = dict(zip(names, sess.run(None, feeds)))
        return self.InferenceResponse([self.Tensor(n, res[n]) for n in req.outputs])


def load_bls(repo: Path, monkeypatch):
    """The repository's entry model.py, imported against FakeBackend, initialized as Triton would."""
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient (the serve extra)")
    from quota_export.serve.protocol import MODEL_NAME

    fake = FakeBackend(repo)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("quota_vlm_bls_model", repo / MODEL_NAME / "1" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.TritonPythonModel()
    model.initialize({"model_repository": str(repo / MODEL_NAME), "model_version": "1", "model_name": MODEL_NAME,
                      "model_config": (repo / MODEL_NAME / "config.pbtxt").read_text()})
    return model, fake


@pytest.fixture
def bls_model(repo, monkeypatch):
    return load_bls(repo, monkeypatch)


def _request(fake, **inputs):
    class Req:
        def __init__(self, tensors):
            self.inputs = tensors

    return Req([fake.Tensor(k, v) for k, v in inputs.items()])


def _sample_inputs(s, **extra):
    return {"image": np.array([Path(s.image).read_bytes()], dtype=np.object_),
            "prompt": np.array([s.question.encode()], dtype=np.object_), **extra}


def test_bls_model_answers_as_run(bls_model, samples, run_answers):
    model, fake = bls_model
    bad = _request(fake, **_sample_inputs(samples[0], max_new_tokens=np.array([0], np.int32)))
    reqs = [_request(fake, **_sample_inputs(s)) for s in samples]
    responses = model.execute(reqs[:3] + [bad] + reqs[3:])
    assert len(responses) == len(samples) + 1
    assert responses[3].has_error() and responses[3].error().message() == "error: max_new_tokens: must be at least 1, got 0"
    got = []
    for r in responses[:3] + responses[4:]:
        assert not r.has_error(), r.error().message()
        out = {t.name(): t.as_numpy() for t in r.output_tensors()}
        got.append((out["answer"][0].decode(), out["tokens"].tolist()))
    assert got == run_answers
    # every answer went through the repository's models: vision and prefill once, then a decode
    # step after every token but a final EOS, each fed by one embed call (plus the prompt's)
    eos = 2  # the shipped tokenizer's </s>
    steps = sum(len(t) - (t[-1] == eos) for _, t in run_answers)
    assert fake.calls["quota_vlm_vision"] == fake.calls["quota_vlm_prefill"] == len(samples)
    assert fake.calls["quota_vlm_decode"] == steps and fake.calls["quota_vlm_embed"] == len(samples) + steps


def test_bls_model_max_new_tokens(bls_model, samples, run_answers):
    model, fake = bls_model
    (r,) = model.execute([_request(fake, **_sample_inputs(samples[1], max_new_tokens=np.array([1], np.int32)))])
    out = {t.name(): t.as_numpy() for t in r.output_tensors()}
    assert out["tokens"].tolist() == run_answers[1][1][:1]


def test_export_tensorrt_target_build(tmp_path, monkeypatch, samples):
    """A `--target tensorrt` build (here without engines: no TensorRT, no GPU): prefill's
    quota::TokenGather plugin nodes cannot run on the ONNX Runtime backend, so the repository gets
    the gathers inlined in standard ops (as OrtRunner runs them), and answers stay `run`'s."""
    import onnx

    from quota_export.data import load_image
    from quota_export.runtime.ort import OrtRunner

    out = tmp_path / "trt"
    assert main(["build", "--recipe", str(ROOT / "recipes" / "default.yaml"), "--out", str(out), "--target",
                 "tensorrt", "--bench", str(TEST_SPLIT), "--samples", "1"]) == 3  # graphs written, no engines
    assert {n.domain for n in onnx.load(str(out / "prefill.onnx")).graph.node} >= {"quota"}
    assert main(["export-triton", "--artifacts", str(out), "--out", str(tmp_path / "repo")]) == 0
    for g in ("vision", "embed", "prefill", "decode"):
        d = tmp_path / "repo" / f"quota_vlm_{g}"
        assert _parse(d / "config.pbtxt").backend == "onnxruntime" and not (d / "1" / "model.plan").exists()
        assert {n.domain for n in onnx.load(str(d / "1" / "model.onnx")).graph.node} <= {"", "ai.onnx"}
    model, fake = load_bls(tmp_path / "repo", monkeypatch)
    runner = OrtRunner(out)
    picked = samples[:4]
    responses = model.execute([_request(fake, **_sample_inputs(s)) for s in picked])
    for r, s in zip(responses, picked):
        res = runner.generate(load_image(s), s.question)
        out_t = {t.name(): t.as_numpy() for t in r.output_tensors()}
        assert (out_t["answer"][0].decode(), out_t["tokens"].tolist()) == (res.text, res.tokens)


# ---------------------------------------------------------------- PyTriton server (`serve`)


@pytest.mark.parametrize("argv, needles", [
    (["--instances", "0"], ["--instances", "at least 1"]),
    (["--http-port", "70000"], ["--http-port", "70000"]),
    (["--grpc-port", "8000", "--http-port", "8000"], ["must differ"]),
])
def test_serve_bad_arguments(built, capsys, argv, needles):
    assert main(["serve", "--artifacts", str(built), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(n in err[0] for n in needles), err


def test_serve_port_in_use_and_missing_artifacts(built, tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--artifacts", str(built), "--http-port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --http-port: cannot listen on 127.0.0.1:{port}"), err
    from quota_export.serve.local import free_ports

    http, grpc, metrics = free_ports(3)
    assert main(["serve", "--artifacts", str(tmp_path / "nope"), "--http-port", str(http), "--grpc-port", str(grpc),
                 "--metrics-port", str(metrics)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'nope'}: artifacts folder not found"]


@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    """`python -m quota_export serve` on 127.0.0.1 with 2 instances (a LocalServer). One server
    for the module: the SIGTERM test, last, stops it."""
    pytest.importorskip("pytriton.triton", reason="needs the serve extra (docs/serving.md): "
                        "pip install -e '.[serve]' && pip install --no-deps nvidia-pytriton==0.7.0 tritonclient==2.73.0")
    from quota_export.serve.local import LocalServer

    srv = LocalServer(built, 2, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        srv.start()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield srv
    srv.stop()


def test_serve_answers_as_run_over_http_and_grpc(server, samples, run_answers):
    from quota_export.serve.client import ServerError, ask, connect

    http, grpc = server.ports[:2]
    results, errors = {}, []

    def client(proto, url, idx):
        c = connect(url, proto)
        for i in idx:
            try:
                results[(proto, i)] = ask(c, Path(samples[i].image).read_bytes(), samples[i].question)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"{proto} {i}: {e}")

    n = 6
    threads = [threading.Thread(target=client, args=(p, f"127.0.0.1:{port}", range(k, n, 2)))
               for p, port in (("http", http), ("grpc", grpc)) for k in (0, 1)]  # 4 clients x 3 requests
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert results == {(p, i): run_answers[i] for p in ("http", "grpc") for i in range(n)}

    # a bad request gets `run`'s one-line error, and the server keeps serving
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    for proto, port in (("http", http), ("grpc", grpc)):
        c = connect(f"127.0.0.1:{port}", proto)
        with pytest.raises(ServerError) as e:  # (an image of another size is fine: LLaVA resizes it)
            ask(c, buf.getvalue(), "   ")
        assert e.value.line == "error: prompt: empty", str(e.value)
        with pytest.raises(ServerError) as e:
            ask(c, b"not an image", samples[0].question)
        assert e.value.line.startswith("error: image: 12 bytes that are no image file"), str(e.value)
        assert ask(c, Path(samples[2].image).read_bytes(), samples[2].question) == run_answers[2]
        assert ask(c, Path(samples[2].image).read_bytes(), samples[2].question, max_new_tokens=1)[1] == \
            run_answers[2][1][:1]
    assert server.proc.poll() is None


def test_serve_killed_and_restarted_loses_nothing(server, samples, run_answers):
    """The load benchmark's restart phase, small: 2 clients x 3 requests, SIGKILL of the server's
    process group after 2 answers, a new server on the same ports; the failed requests are retried."""
    from quota_export.serve.local import kill_and_restart

    v, killed, _ = kill_and_restart(server, samples[:6], 2, 3, run_answers[:6], after=2)
    assert killed["at"] >= 2 and killed["down"] > 0
    assert (v["answered"], v["lost"], v["wrong"], v["dup"], v["failures"]) == (6, 0, 0, 0, [])
    assert v["retried"] >= 1  # at least the next request of the client whose answer triggered the kill


def test_serve_sigterm_finishes_in_flight_requests(server, samples, run_answers):
    from quota_export.serve.client import ask, connect

    http = server.ports[0]
    got, errors = [], []
    n = 12  # 12 requests on 2 instances: when the first answer is back, 10 are queued or running
    sent, first = threading.Semaphore(0), threading.Event()

    def one(i):
        c = connect(f"127.0.0.1:{http}")
        try:
            sent.release()
            ans = ask(c, Path(samples[i].image).read_bytes(), samples[i].question)
            got.append((time.monotonic(), i, ans))
            first.set()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(str(e))
        finally:
            c.close()  # tritonserver's shutdown waits (up to --exit-timeout) for open HTTP connections

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):
        assert sent.acquire(timeout=60)
    assert first.wait(120), errors
    time.sleep(0.05)  # the last request's bytes are on the wire
    t_term = time.monotonic()
    rc = server.terminate()  # SIGTERM to the serve process only, as docker stop / Kubernetes send it
    for t in threads:
        t.join(120)
    assert rc == 0
    assert "stopped serving" in server.log.read_text()  # one write; other processes' output may surround it
    assert not errors, errors  # every request sent before the SIGTERM was answered, correctly
    assert sorted((i, a) for _, i, a in got) == [(i, run_answers[i]) for i in range(n)]
    assert max(t for t, _, _ in got) > t_term, "no request was in flight at SIGTERM: the test proved nothing"
