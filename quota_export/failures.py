"""The CLI's one error path (docs/reliability.md): which failures are the input's fault and how
they read on one line. `UserError` is handled by the CLI itself; these are the kinds raised by
libraries on bad input that no loader turned into a UserError first. Anything else is a bug
and keeps its traceback."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from quota_export import one_line


def _interruption(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C / SIGTERM behind e, also when a library turned it into its own error (an
    extension module interrupted while it loads raises ImportError from it)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def expected_failure(e: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) for a failure caused by the input or by an interruption, None for
    anything else. Exit codes: 2 bad input, 130 Ctrl-C, 143 SIGTERM."""
    stop = _interruption(e)
    if stop is not None:
        return ("terminated", 143) if str(stop) == "terminated" else ("interrupted", 130)
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(e, pil.DecompressionBombError):
        return f"image too large: {one_line(e)}", 2
    if isinstance(e, RecursionError):
        return "input nested too deeply (a recipe, JSON or YAML file with too many levels)", 2
    if isinstance(e, UnicodeError):
        return f"text is not valid UTF-8: {one_line(e)}", 2
    if isinstance(e, MemoryError):
        return "out of memory (an input too large for this machine?)", 2
    if isinstance(e, OSError) and (e.filename is not None or e.strerror):
        where = f"{e.filename}: " if e.filename is not None else ""
        return f"{where}{e.strerror or one_line(e)}", 2
    return None


@contextlib.contextmanager
def terminate_as_interrupt():
    """While the block runs (main thread only), SIGTERM raises KeyboardInterrupt("terminated"), so
    `finally` clauses run (a build removes its temporary folder) before the process ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt("terminated")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
