"""`python -m quota_export serve`: the built graphs behind Triton Inference Server (PyTriton).

    client --HTTP/gRPC--> tritonserver (PyTriton's, 127.0.0.1) --Python backend stub--> this process
        instance i: Answerer(OrtRunner per graph set).generate(image, prompt, max_new_tokens)

The answers come from `OrtRunner.generate`, the runner `run` uses. The graphs take batch 1
(`[1, ...]` everywhere, the KV cache of one prompt), so Triton's dynamic batcher is off and
throughput comes from instances: each one its own sessions, on its share of the cores.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from quota_export import UserError
from quota_export.serve.protocol import INPUTS, MODEL_NAME, OUTPUTS, RequestError, answer_outputs, parse_request

LOG = logging.getLogger("quota_export.serve")


class Answerer:
    """One model instance: OrtRunner sessions for every graph set of the build (one set unless
    export.image_sizes), answering requests one at a time (PyTriton calls an instance serially)."""

    def __init__(self, artifacts: Path, threads: int):
        from quota_export.runtime.ort import OrtRunner, graph_sets

        self.artifacts = Path(artifacts)
        self.runners = {folder: OrtRunner(folder, threads) for _, folder in graph_sets(self.artifacts)}
        first = next(iter(self.runners.values()))
        self.max_seq = int(first.manifest["export"]["max_seq"])

    def answer(self, inputs: dict) -> dict:
        """{input name: array} -> {output name: array}; UserError for a bad request."""
        from quota_export.runtime.ort import set_for_image

        image, prompt, max_new = parse_request(inputs, self.max_seq)
        runner = self.runners[set_for_image(self.artifacts, image.shape[:2])] if len(self.runners) > 1 \
            else next(iter(self.runners.values()))
        res = runner.generate(image, prompt, max_new)
        return answer_outputs(res.tokens, res.text)

    def __call__(self, requests):
        out = []
        for r in requests:
            try:
                out.append(self.answer(dict(r.data)))
            except UserError as e:
                LOG.warning("bad request: %s", e)
                raise RequestError(str(e)) from None
        return out


def _check_free(flag: str, host: str, port: int) -> None:
    """A one-line error now rather than a tritonserver start-up failure later."""
    import socket

    with socket.socket() as s:
        # as tritonserver binds (SO_REUSEADDR): a port left in TIME_WAIT by a previous server is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"{flag}: cannot listen on {host}:{port} ({e.strerror})") from None


def instance_threads(instances: int) -> int:
    """ORT intra-op threads per instance: $OMP_NUM_THREADS if set, else the cores shared out."""
    from quota_export.runtime.ort import _env_threads

    return _env_threads() or max(1, (os.cpu_count() or 1) // instances)


def serve(artifacts: Path, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, instances: int = 1, stub_env_dir: Path | None = None,
          exit_timeout: int = 30, log=lambda m: print(m, flush=True)) -> int:
    """Run until SIGTERM / SIGINT; in-flight requests finish (up to exit_timeout s), then exit 0."""
    from quota_export.serve import stub_env

    if instances < 1:
        raise UserError(f"--instances: must be at least 1, got {instances}")
    ports = (("--http-port", http_port), ("--grpc-port", grpc_port), ("--metrics-port", metrics_port))
    for name, port in ports:
        if not 0 < port < 65536:
            raise UserError(f"{name}: {port} is not a TCP port")
    if len({http_port, grpc_port, metrics_port}) < 3:
        raise UserError(f"--http-port, --grpc-port, --metrics-port: must differ, got {http_port}, {grpc_port}, {metrics_port}")
    for name, port in ports:
        _check_free(name, host, port)
    threads = instance_threads(instances)
    answerers = [Answerer(artifacts, threads) for _ in range(instances)]  # bad artifacts fail here, before any server
    stub_env.require_pytriton()
    env = stub_env.stub_env(stub_env_dir, log)
    stub_env.apply(env)

    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a bad request is logged once, in one line, by Answerer; PyTriton would add its traceback
    logging.getLogger("pytriton.proxy.inference").setLevel(logging.ERROR)
    cfg = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                       metrics_address=host, metrics_port=metrics_port, exit_timeout_secs=exit_timeout,
                       allow_gpu_metrics=False, log_verbose=0)
    # SIGTERM (docker stop, Kubernetes) as SIGINT: PyTriton then stops tritonserver, which refuses
    # new requests and waits for the in-flight ones before the models are unloaded
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with Triton(config=cfg) as triton:
            triton.bind(
                model_name=MODEL_NAME,
                infer_func=answerers,  # one instance each
                inputs=[Tensor(name=n, dtype=d, shape=s, optional=o) for n, d, _, s, o in INPUTS],
                outputs=[Tensor(name=n, dtype=d, shape=s) for n, d, _, s, _ in OUTPUTS],
                config=ModelConfig(batching=False),
                strict=True,
            )
            log(f"serving {artifacts} as model {MODEL_NAME!r}: HTTP {host}:{http_port}, gRPC {host}:{grpc_port}, "
                f"metrics {host}:{metrics_port}; {instances} instance(s), {threads} thread(s) each; batch-1 graphs: "
                "no dynamic batching, scale with --instances")
            log(f"ready: GET http://{host}:{http_port}/v2/health/ready; stop with SIGTERM or Ctrl-C")
            triton.serve()
    except KeyboardInterrupt:  # SIGTERM / Ctrl-C before the serving loop: the `with` has stopped tritonserver
        pass
    log(f"stopped serving {artifacts}")
    return 0


