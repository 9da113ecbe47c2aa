"""Measured benchmark rows kept for later runs (`--reuse` of retention.py and accuracy.py).

A row is keyed by the sha256 of the model's weights, the package version and the row's own
settings (bench slice, method, quantization, budget, ...), so a row measured on other weights or
other settings is never taken; rows that depend on a recipe are not cached by the scripts.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path


def weights_sha256(model: str | Path) -> str:
    """sha256 over the model folder's *.safetensors files, in name order."""
    h = hashlib.sha256()
    for f in sorted(Path(model).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


class RowCache:
    """`measure(key, fn)` -> (metrics, seconds): from `path` when `reuse` and the row is there,
    else `fn()` timed now and recorded (the file is replaced whole, never left half-written)."""

    def __init__(self, path: Path, model: str | Path, reuse: bool):
        from quota_export import __version__

        self.path, self.reused = Path(path), 0
        self.sha, self.version = weights_sha256(model), __version__
        try:
            self.rows = json.loads(self.path.read_text()) if reuse and self.path.exists() else {}
        except ValueError:
            sys.exit(f"error: --reuse: {self.path} is not valid JSON; remove it or drop --reuse")

    def measure(self, key, fn):
        k = json.dumps([self.sha, self.version, *key])
        if k in self.rows:
            self.reused += 1
            return self.rows[k]["metrics"], self.rows[k]["seconds"]
        t = time.perf_counter()
        m = fn()
        secs = time.perf_counter() - t
        self.rows[k] = {"metrics": m, "seconds": secs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.rows, indent=1, sort_keys=True))
        tmp.replace(self.path)
        return m, secs
