"""Graphs over 2 GiB: ONNX external data.

A serialized ModelProto cannot exceed 2 GiB (protobuf's limit): a 7B decoder's prefill graph with
4-bit weights, or a Llama-3 embedding table in fp32, does. A graph whose tensor data exceeds
EXTERNAL_DATA_BYTES is therefore written as two files:

    <graph>.onnx        the graph, each tensor of >= 1 KiB naming its bytes in the data file
    <graph>.onnx.data   those tensors' bytes, in graph order (onnx.save_model, one file per graph)

and checked by path (onnx.checker reads the data file itself); ONNX Runtime loads it by path and
finds the data file beside it. Below the threshold a graph is one file, byte for byte as before.
The build's manifest hashes the data files with the other files it writes (`files`), and the
runner checks them before loading.

Streaming (`streaming(folder)`, what `build` uses): a graph built inside it (ops/graph.py `Graph`)
writes each initializer's bytes to `<folder>/<graph>.onnx.data` as soon as it is made, so the
graph never holds its weights in memory; once complete, a graph at or below the threshold takes
its bytes back (one file, as before). Same layout as `onnx.save_model` (initializers in graph
order, those of >= 1 KiB, no padding): the same bytes as writing the whole graph at the end.
"""

from __future__ import annotations

import hashlib
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

# graphs whose tensor data exceeds this are written with external data (tests lower it)
EXTERNAL_DATA_BYTES = 1 << 30
SIZE_THRESHOLD = 1024  # onnx.save_model's: tensors whose raw bytes (sys.getsizeof) reach it go to the data file
_FOLDER: ContextVar[Path | None] = ContextVar("quota_export_stream_folder", default=None)


@contextmanager
def streaming(folder: Path):
    """Graphs built inside write their initializers to `<folder>/<graph name>.onnx.data` as they come."""
    token = _FOLDER.set(Path(folder))
    try:
        yield
    finally:
        _FOLDER.reset(token)


class Spill:
    """A graph's initializers, each written to its data file when added (`Graph.init`)."""

    def __init__(self, folder: Path, graph: str):
        self.path = Path(folder) / data_name(Path(f"{graph}.onnx"))
        self.file = None  # opened at the first tensor it takes
        self.size = 0  # bytes in the data file

    @classmethod
    def current(cls, graph: str) -> "Spill | None":
        folder = _FOLDER.get()
        return None if folder is None else cls(folder, graph)

    def add(self, t):
        """-> the tensor to keep in the graph: `t`, or (its bytes written) a copy of it without them.
        A copy, because clearing a field of a protobuf message does not free its bytes (the upb
        backend allocates them in the message's arena, freed with the message)."""
        import onnx
        from onnx.external_data_helper import set_external_data

        if not t.HasField("raw_data") or sys.getsizeof(t.raw_data) < SIZE_THRESHOLD:
            return t
        n = len(t.raw_data)
        if self.file is None:
            self.file = open(self.path, "xb")
        self.file.write(t.raw_data)
        set_external_data(t, self.path.name, self.size, n)
        t.ClearField("raw_data")
        self.size += n
        light = onnx.TensorProto()
        light.CopyFrom(t)
        return light

    def finish(self, m) -> None:
        """The graph `m` is complete: a large one keeps its data file, a small one takes its bytes back."""
        from onnx.external_data_helper import _get_initializer_tensors

        if self.file is None:
            return
        self.file.close()
        if is_large(m):
            return
        with open(self.path, "rb") as f:
            for t in _get_initializer_tensors(m):
                if t.data_location == t.EXTERNAL:
                    info = {e.key: e.value for e in t.external_data}
                    f.seek(int(info["offset"]))
                    t.raw_data = f.read(int(info["length"]))
                    del t.external_data[:]
                    t.ClearField("data_location")
        self.path.unlink()


def tensor_bytes(m) -> int:
    """Bytes of a graph's tensors (initializers, Constant attributes, subgraphs'): nearly all of its
    serialized size, counted without serializing it (which fails above 2 GiB)."""
    from onnx.external_data_helper import _get_all_tensors

    return sum(len(t.raw_data) if t.HasField("raw_data") else _external_length(t) or t.ByteSize()
               for t in _get_all_tensors(m))


def stream_exported(m, src: Path, graph: str) -> bool:
    """Inside `streaming`, for a large graph `m` whose tensors sit in an exporter's external files
    under `src`: copy them to `<folder>/<graph>.onnx.data` in onnx.save_model's layout (the tensors
    of >= 1 KiB in initializer order; the others read into the graph) and point `m` there. -> True
    if done; False (nothing changed) outside `streaming` or for a graph within the threshold."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, _get_initializer_tensors, load_external_data_for_tensor

    folder = _FOLDER.get()
    if folder is None or not is_large(m):
        return False
    out = Path(folder) / data_name(Path(f"{graph}.onnx"))
    with open(out, "xb") as f:
        for t in _get_initializer_tensors(m):
            if t.data_location == t.EXTERNAL:
                info = ExternalDataInfo(t)
                src_file = Path(src) / info.location
                n = info.length if info.length else src_file.stat().st_size - (info.offset or 0)
                if sys.getsizeof(b"") + n < SIZE_THRESHOLD:
                    load_external_data_for_tensor(t, str(src))
                    del t.external_data[:]
                    t.ClearField("data_location")
                    continue
                with open(src_file, "rb") as g:
                    g.seek(info.offset or 0)
                    off = f.tell()
                    left = n
                    while left:
                        chunk = g.read(min(left, 64 << 20))
                        if not chunk:
                            raise ValueError(f"{src_file}: truncated external data of {t.name}")
                        f.write(chunk)
                        left -= len(chunk)
                _point(t, out.name, off, n)
            elif t.HasField("raw_data") and sys.getsizeof(t.raw_data) >= SIZE_THRESHOLD:
                off = f.tell()
                f.write(t.raw_data)
                _point(t, out.name, off, len(t.raw_data))
                t.ClearField("raw_data")
    for t in _get_all_tensors(m):  # tensors outside the initializers stay in the graph (as save_model)
        if t.data_location == t.EXTERNAL and not any(e.key == "location" and e.value == out.name for e in t.external_data):
            load_external_data_for_tensor(t, str(src))
            del t.external_data[:]
            t.ClearField("data_location")
    return True


def _point(t, location: str, offset: int, length: int) -> None:
    """`t`'s bytes are at [offset, offset + length) of `location` (the entries set_external_data writes)."""
    del t.external_data[:]
    t.data_location = t.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def _external_length(t) -> int:
    return int({e.key: e.value for e in t.external_data}.get("length", 0)) if t.data_location == t.EXTERNAL else 0


def streamed(m) -> bool:
    """True if `m`'s tensors already sit in its data file (built inside `streaming`)."""
    from onnx.external_data_helper import _get_initializer_tensors

    return any(t.data_location == t.EXTERNAL for t in _get_initializer_tensors(m))


def is_large(m) -> bool:
    return tensor_bytes(m) > EXTERNAL_DATA_BYTES


def check(m) -> None:
    """onnx.checker on a graph in memory; a large one is checked by path once written (write_graph)."""
    import onnx

    if not is_large(m):
        onnx.checker.check_model(m)


def data_name(path: Path) -> str:
    return Path(path).name + ".data"


def write_graph(m, path: Path) -> dict:
    """Write `m` to `path` (+ `<path>.data` when large); -> {bytes, sha256} of the graph file, and
    for a large graph `external_data`: the data file's name (hashed with the build's other files).
    Same graph -> same bytes in both files. Note: a large `m` is left referring to the data file."""
    import onnx

    path = Path(path)
    if not is_large(m):
        data = m.SerializeToString(deterministic=True)
        path.write_bytes(data)
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if streamed(m):  # its data file is written already (under the graph's name)
        if not (path.parent / data_name(path)).is_file():
            raise ValueError(f"{path}: streamed graph's data file {data_name(path)} is not beside it")
        onnx.save_model(m, str(path))
    else:
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name(path), size_threshold=SIZE_THRESHOLD)
    onnx.checker.check_model(str(path))
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "external_data": data_name(path)}
