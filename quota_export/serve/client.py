"""A tritonclient helper for the served model (HTTP or gRPC): one question -> (answer, tokens).

Works against `serve` (PyTriton) and against a tritonserver loaded with the `export-triton`
repository: both expose the same model (protocol.py)."""

from __future__ import annotations

import re

import numpy as np

from quota_export.serve.protocol import MODEL_NAME


class ServerError(Exception):
    """The server answered with an error; `line` is its one-line `error: ...` when it sent one."""

    def __init__(self, message: str):
        super().__init__(message)
        # Triton wraps the model's message ("... Model execute error: Traceback ...
        # TritonModelException: error: image: ..."): the model's own line is the last `error: `
        # that starts a line or follows a `Type: ` prefix
        found = re.findall(r"(?:^|: )(error: [^\n]*)", message, flags=re.M)
        self.line = found[-1].strip() if found else None


def connect(url: str, protocol: str = "http", timeout: float = 60.0):
    """A tritonclient InferenceServerClient for url "host:port"."""
    if protocol == "http":
        import tritonclient.http as tc

        return tc.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
    import tritonclient.grpc as tc

    return tc.InferenceServerClient(url)


def ask(client, image_bytes: bytes, prompt: str, max_new_tokens: int | None = None,
        model: str = MODEL_NAME, timeout: float | None = None) -> tuple[str, list[int]]:
    """-> (answer, token ids); ServerError if the server refused the request."""
    from tritonclient.utils import InferenceServerException

    grpc = type(client).__module__.startswith("tritonclient.grpc")
    if grpc:
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    feeds = [("image", np.array([image_bytes], dtype=np.object_), "BYTES"),
             ("prompt", np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES")]
    if max_new_tokens is not None:
        feeds.append(("max_new_tokens", np.array([max_new_tokens], dtype=np.int32), "INT32"))
    inputs = []
    for name, arr, dt in feeds:
        i = tc.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    outputs = [tc.InferRequestedOutput("answer"), tc.InferRequestedOutput("tokens")]
    kw = {"client_timeout": timeout} if grpc else {}
    try:
        r = client.infer(model, inputs, outputs=outputs, **kw)
    except InferenceServerException as e:
        raise ServerError(e.message() or str(e)) from None
    return r.as_numpy("answer")[0].decode("utf-8"), r.as_numpy("tokens").tolist()
