"""A `serve` subprocess on 127.0.0.1 for the tests and the load benchmark: free ports, start,
wait until ready (bounded), SIGTERM, or SIGKILL of its whole process group (tritonserver and the
stubs included, as a crashed machine would lose them).

PyTriton keeps a workspace (a copy of tritonserver, the model store) under $PYTRITON_HOME and
4 MB shared-memory blocks /dev/shm/pytrtion<pid>-*; a graceful stop removes both, a SIGKILL
cannot. Each LocalServer gets its own PYTRITON_HOME, and `kill` removes it and the blocks named
after the killed process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    """n TCP ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalServer:
    def __init__(self, artifacts: Path, instances: int, log: Path, ports: list[int] | None = None):
        self.ports = ports or free_ports(3)  # http, grpc, metrics
        self.args = [sys.executable, "-m", "quota_export", "serve", "--artifacts", str(artifacts), "--instances",
                     str(instances), "--http-port", str(self.ports[0]), "--grpc-port", str(self.ports[1]),
                     "--metrics-port", str(self.ports[2])]
        self.log = Path(log)
        self.home = self.log.parent / f"pytriton-home-{self.ports[0]}"
        self.proc: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.ports[1]}"

    def start(self, timeout: float = 600) -> float:
        """Start and wait until the model is ready; -> seconds it took. RuntimeError with the log's
        tail if the server exits or is not ready in time (the first start on a machine also
        creates the stub environment: a pip install)."""
        from quota_export.serve.client import connect
        from quota_export.serve.protocol import MODEL_NAME

        t0 = time.monotonic()
        env = {**os.environ, "PYTRITON_HOME": str(self.home)}
        with open(self.log, "a") as f:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=env)
        c = connect(self.http)
        try:
            while time.monotonic() - t0 < timeout and self.proc.poll() is None:
                try:
                    if c.is_server_ready() and c.is_model_ready(MODEL_NAME):
                        return time.monotonic() - t0
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                time.sleep(0.5)
        finally:
            c.close()
        self.kill()
        raise RuntimeError(f"serve did not become ready; log {self.log}:\n" + self.log.read_text()[-3000:])

    def terminate(self, timeout: float = 120) -> int:
        """SIGTERM to the serve process only (as docker stop / Kubernetes send it); -> exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL to the whole process group: serve, tritonserver, the stubs."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(60)
            shutil.rmtree(self.home, ignore_errors=True)
            for p in Path("/dev/shm").glob(f"pytrtion{self.proc.pid}-*"):
                p.unlink(missing_ok=True)

    def stop(self) -> None:
        """Graceful stop if it still runs (SIGTERM), SIGKILL if that does not end it in 120 s."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()
