"""Resident memory at phase boundaries: `QUOTA_MEMTRACE=1` logs one line per phase to stderr.

    memtrace: load                       +42.1 s  rss 3.10 GiB (anon 0.52, file 2.58)  peak 3.40 GiB

`peak` is the highest resident size since the previous mark (Linux: VmHWM, reset at every mark by
writing 5 to /proc/self/clear_refs), so each line says what its phase needed at most; `file` is
resident pages of mapped files (the checkpoint's safetensors, ONNX Runtime's mapped external
data), `anon` the process's own memory. Off (the default) a mark costs one environment lookup.
Linux only (elsewhere nothing is logged). docs/large-models.md.
"""

from __future__ import annotations

import os
import sys
import time

_T0 = time.monotonic()
_last = [_T0]


def enabled() -> bool:
    return os.environ.get("QUOTA_MEMTRACE", "") not in ("", "0") and sys.platform.startswith("linux")


def status() -> dict[str, int]:
    """{VmRSS, VmHWM, RssAnon, RssFile, ...} of this process in bytes (/proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            parts = v.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[k] = int(parts[0]) << 10
    return out


def reset_peak() -> bool:
    """Start a new peak (VmHWM := VmRSS); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mark(phase: str) -> None:
    """Log the phase that just ended (its peak and the resident size now), then start the next."""
    if not enabled():
        return
    s = status()
    now = time.monotonic()
    g = 1 << 30
    print(f"memtrace: {phase:<36} {now - _last[0]:+8.1f} s  rss {s.get('VmRSS', 0) / g:.2f} GiB "
          f"(anon {s.get('RssAnon', 0) / g:.2f}, file {s.get('RssFile', 0) / g:.2f})  "
          f"peak {s.get('VmHWM', 0) / g:.2f} GiB", file=sys.stderr, flush=True)
    _last[0] = now
    reset_peak()
