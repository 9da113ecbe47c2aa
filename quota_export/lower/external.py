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
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# graphs whose tensor data exceeds this are written with external data (tests lower it)
EXTERNAL_DATA_BYTES = 1 << 30


def tensor_bytes(m) -> int:
    """Bytes of a graph's tensors (initializers, Constant attributes, subgraphs'): nearly all of its
    serialized size, counted without serializing it (which fails above 2 GiB)."""
    from onnx.external_data_helper import _get_all_tensors

    return sum(len(t.raw_data) if t.HasField("raw_data") else t.ByteSize() for t in _get_all_tensors(m))


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
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name(path), size_threshold=1024)
    onnx.checker.check_model(str(path))
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "external_data": data_name(path)}
