"""`python -m quota_export serve` (the graphs behind Triton, here PyTriton) and
`python -m quota_export export-triton` (a model repository for a full tritonserver).
docs/serving.md has both, the client side and the load test."""

from __future__ import annotations

from pathlib import Path

from quota_export.__main__ import args, command


def _serve_args(p):
    p.add_argument("--artifacts", required=True, type=Path, help="a folder written by `build`")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--instances", type=int, default=1,
                   help="model instances, each with its own sessions (the graphs take batch 1; default 1)")
    p.add_argument("--stub-env", type=Path,
                   help="Python env (numpy<2, pyzmq) for Triton's Python stub; default: made once in the user cache")
    p.add_argument("--exit-timeout", type=int, default=30, help="seconds in-flight requests get at shutdown (default 30)")


@command("serve", "serve built graphs with Triton Inference Server (PyTriton) on 127.0.0.1")
@args(_serve_args)
def cmd_serve(a) -> int:
    from quota_export.serve.pytriton_server import serve

    return serve(a.artifacts, http_port=a.http_port, grpc_port=a.grpc_port, metrics_port=a.metrics_port,
                 instances=a.instances, stub_env_dir=a.stub_env, exit_timeout=a.exit_timeout)


def _export_args(p):
    p.add_argument("--artifacts", required=True, type=Path, help="a folder written by `build`")
    p.add_argument("--out", required=True, type=Path, help="model repository to write (must not exist)")
    p.add_argument("--instances", type=int, default=1, help="instance_group count of every model (default 1)")


@command("export-triton", "write a Triton model repository (ONNX Runtime models + a Python BLS entry model)")
@args(_export_args)
def cmd_export_triton(a) -> int:
    from quota_export.serve.repository import export_repository

    rep = export_repository(a.artifacts, a.out, a.instances)
    print(f"wrote {rep.root}/: " + ", ".join(rep.models))
    print(f"serve it:  tritonserver --model-repository {rep.root}  (needs the onnxruntime and python backends)")
    return 0
