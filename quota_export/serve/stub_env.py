"""Making PyTriton's Python-backend stub run under this interpreter.

PyTriton runs each bound model inside Triton's Python backend: tritonserver starts
`triton_python_backend_stub`, a small C++ program that embeds CPython through
`libpython3.X.so.1.0` and forwards requests to the serving process. Two things go wrong here:

1. Wrong libpython. The stub finds its standard library through the `python3` first on PATH
   (PyTriton puts `sys.exec_prefix/bin` there), but it loads `libpython3.11.so.1.0` through the
   dynamic loader, which knows only the system copy (/lib/x86_64-linux-gnu: Debian's 3.11.2).
   The C runtime is then 3.11.2 and the Python standard library 3.11.7. 3.11.6 added
   `_thread.RLock._recursion_count` (used by multiprocessing/resource_tracker.py since the fix of
   CPython gh-109593), so the stub fails at model load with
   `AttributeError: '_thread.RLock' object has no attribute '_recursion_count'`
   (PyTriton's own tensor store starts a multiprocessing manager). Fix: put this interpreter's
   LIBDIR (which holds its own shared libpython) first on LD_LIBRARY_PATH for the server.
2. numpy 2. The stub's pybind11 layer is built against numpy 1.x (PyTriton pins numpy<2); with
   numpy 2 it builds arrays with the wrong element size (BYTES inputs fail to decode, FP32 outputs
   come back empty). Fix: a Python environment for the stub only, a venv of this interpreter with
   system site-packages (pyzmq, ...) and `numpy==1.26.4` on top. The serving process keeps the
   project's numpy; only the stub imports the venv's.

PyTriton has no setting for the stub's environment: `get_triton_python_backend_python_env` (which
returns sys.exec_prefix) is replaced for this process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from quota_export import UserError

STUB_NUMPY = "numpy==1.26.4"  # the last numpy 1.x with wheels for 3.9-3.12
_CHECK = ("import sys, numpy, zmq; "
          "print('%d.%d' % sys.version_info[:2], numpy.__version__)")


def require_pytriton():
    """Import pytriton, or a one-line error naming the extra to install."""
    try:
        import pytriton.triton  # noqa: F401
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except ImportError as e:
        raise UserError(f"serving needs the `serve` extra (pip install -e '.[serve]'; docs/serving.md): {e}") from None


def default_env_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    v = "%d.%d" % sys.version_info[:2]
    return base / "quota_export" / f"triton-stub-py{v}-{STUB_NUMPY.replace('==', '')}"


def _probe(env: Path) -> str | None:
    """None if env's python has this interpreter's version, numpy 1.x and pyzmq, else why not."""
    py = env / "bin" / "python"
    if not py.is_file():
        return "no bin/python"
    try:
        r = subprocess.run([str(py), "-c", _CHECK], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run bin/python ({e})"
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or ["bin/python failed"])[-1]
    ver, npv = r.stdout.split()
    if ver != "%d.%d" % sys.version_info[:2]:
        return f"Python {ver}, the server runs {sys.version_info[0]}.{sys.version_info[1]}"
    if not npv.startswith("1."):
        return f"numpy {npv} (the stub needs numpy < 2)"
    return None


def stub_env(path: Path | None = None, log=print) -> Path:
    """The Python environment the stub runs in: this interpreter's own if its numpy is 1.x; else
    `path` (checked), else a venv in the user cache, created once (atomically) on first use."""
    import numpy

    if path is None and numpy.__version__.startswith("1."):
        return Path(sys.exec_prefix)
    if path is not None:
        why = _probe(path)
        if why:
            raise UserError(f"--stub-env {path}: not usable for the Triton Python stub: {why}")
        return path
    env = default_env_dir()
    if env.exists():
        why = _probe(env)
        if why:
            raise UserError(f"{env}: not usable for the Triton Python stub ({why}); remove it to have it rebuilt")
        return env
    env.parent.mkdir(parents=True, exist_ok=True)
    tmp = env.with_name(f".{env.name}.{os.getpid()}")
    log(f"creating the Triton Python stub environment {env} (a venv with {STUB_NUMPY}; once)")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp)], check=True,
                       capture_output=True, text=True, timeout=300)
        subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        STUB_NUMPY], check=True, capture_output=True, text=True, timeout=600)
        why = _probe(tmp)
        if why:
            raise UserError(f"{env}: the new stub environment does not work: {why}")
        os.replace(tmp, env)
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or e.stdout or "").strip().splitlines()
        raise UserError(f"cannot create the Triton Python stub environment {env}: "
                        f"{tail[-1] if tail else e}") from None
    except subprocess.TimeoutExpired as e:
        raise UserError(f"cannot create the Triton Python stub environment {env}: timed out ({e.timeout:.0f} s)") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return env


def apply(env: Path) -> None:
    """Point this process's future tritonserver (and its stubs) at the matching libpython and env."""
    import pytriton.server.triton_server as ts

    libdir = sysconfig.get_config_var("LIBDIR")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libdir:
        raise UserError(f"{sys.executable}: a Python without a shared libpython; the Triton Python stub "
                        "needs one (build Python with --enable-shared, e.g. pyenv with "
                        "PYTHON_CONFIGURE_OPTS=--enable-shared)")
    old = os.environ.get("LD_LIBRARY_PATH", "")
    if old.split(":")[0] != libdir:
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{old}" if old else libdir
    ts.get_triton_python_backend_python_env = lambda: env
