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
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PHASE_DEADLINE_S = 600
RETRY_WINDOW_S, RETRY_PAUSE_S = 180, 1.0  # a failed request is retried for up to 3 min


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


def load(ports, samples, clients: int, requests: int, on_answer=None) -> dict:
    """clients threads x requests each; -> per-id answers, latencies, retries, wall time."""
    from quota_export.serve.client import ServerError, ask, connect

    answers: dict[int, list] = {i: [] for i in range(clients * requests)}
    lat, retried, failures = [], [], []
    lock = threading.Lock()
    deadline = time.monotonic() + PHASE_DEADLINE_S

    def client(c: int):
        proto = "http" if c % 2 == 0 else "grpc"
        url = f"127.0.0.1:{ports[0] if proto == 'http' else ports[1]}"
        conn = connect(url, proto)
        for k in range(requests):
            rid = c * requests + k
            s = samples[rid]
            data = Path(s.image).read_bytes()
            give_up = time.monotonic() + RETRY_WINDOW_S
            while True:
                if time.monotonic() > min(deadline, give_up):
                    failures.append(f"{rid}: no answer (retried for {RETRY_WINDOW_S} s)")
                    break
                if time.monotonic() > deadline:
                    failures.append(f"{rid}: deadline")
                    return
                t0 = time.monotonic()
                try:
                    ans = ask(conn, data, s.question, timeout=120)
                except ServerError as e:
                    if e.line is not None:  # the model refused the request: a real error, not retried
                        failures.append(f"{rid}: {e.line}")
                        break
                    err = e  # no model line: the server is down or not ready (gRPC UNAVAILABLE, ...)
                except Exception as e:  # noqa: BLE001 - HTTP: connection refused / reset
                    err = e
                else:
                    err = None
                if err is not None:
                    retried.append((rid, t0))
                    time.sleep(RETRY_PAUSE_S)
                    try:
                        conn = connect(url, proto)
                    except Exception:  # noqa: BLE001 - the next attempt reports
                        pass
                    continue
                with lock:
                    answers[rid].append(ans)
                    lat.append(time.monotonic() - t0)
                    n_done = sum(1 for v in answers.values() if v)
                if on_answer:
                    on_answer(n_done)
                break
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PHASE_DEADLINE_S + 60)
    return {"answers": answers, "lat": lat, "retried": retried, "failures": failures, "wall": time.monotonic() - t0}


def verdict(res: dict, reference: list) -> dict:
    ans = res["answers"]
    lost = sum(1 for v in ans.values() if not v)
    dup = sum(1 for v in ans.values() if len(v) > 1)
    wrong = sum(1 for i, v in ans.items() if v and any(a != reference[i] for a in v))
    lat = sorted(res["lat"])
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {"n": len(ans), "answered": len(ans) - lost, "lost": lost, "dup": dup, "wrong": wrong,
            "retried": len({r for r, _ in res["retried"]}), "rps": (len(ans) - lost) / res["wall"], "p50": q[49] * 1e3,
            "p99": q[98] * 1e3, "wall": res["wall"], "failures": res["failures"]}


def kill_and_restart(srv: LocalServer, samples, clients: int, requests: int, reference: list, after: int):
    """`load` on a running srv; once `after` answers are in, SIGKILL its process group and start it
    again on the same ports. -> (verdict, {"at", "t", "down"}, requests in flight at the kill)."""
    killed: dict = {}
    once = threading.Lock()

    def on_answer(done):
        with once:  # two clients answered at once must not both kill (and restart) the server
            if done < after or killed:
                return
            killed["at"] = done
            killed["t"] = time.monotonic()
        srv.kill()

        def restart():
            killed["down"] = srv.start(PHASE_DEADLINE_S)

        threading.Thread(target=restart).start()

    res = load(srv.ports, samples, clients, requests, on_answer)
    first_fail: dict = {}
    for rid, t in res["retried"]:
        first_fail[rid] = min(t, first_fail.get(rid, t))
    in_flight = sum(1 for t in first_fail.values() if t < killed.get("t", 0))
    return verdict(res, reference), killed, in_flight
