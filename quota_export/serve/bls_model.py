"""The model repository's entry model (Triton Python backend, BLS): OrtRunner's generate loop,
with each graph run as a model of the repository through a BLS request.

    request(image, prompt, max_new_tokens)
      -> processor (build/processor) -> quota_vlm_vision, quota_vlm_embed -> quota_vlm_prefill
      -> loop: argmax -> quota_vlm_embed -> quota_vlm_decode(past.* = present.*, merge.*)
      -> answer, tokens

The KV cache between steps stays in the graphs' quantized form (uint8 codes, scales, zeros:
present.* of one step are past.* of the next), carried as BLS tensors. The loop itself is
OrtRunner.generate (runtime/ort.py); only `_run` differs. This file is copied to
<repository>/quota_vlm/1/model.py by `export-triton`; the Python backend's environment needs
quota_export installed (numpy, transformers, pillow for the processor).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from quota_export import UserError
from quota_export.runtime.ort import OrtRunner, read_manifest
from quota_export.serve.protocol import INPUTS, answer_outputs, parse_request


class BlsRunner(OrtRunner):
    """OrtRunner whose graphs are the repository's models `<prefix>_<graph>`, called through BLS."""

    def __init__(self, build: Path, prefix: str):
        self.dir = Path(build)
        self.manifest = read_manifest(self.dir)
        self.prefix = prefix
        self.outputs = {g: [o["name"] for o in info["outputs"]] for g, info in self.manifest["graphs"].items()}
        self.sessions = {}  # none here: the graphs are the repository's models
        self._load_model_info()

    def _run(self, g: str, feeds: dict) -> dict:
        model = f"{self.prefix}_{g.removesuffix('.onnx')}"
        req = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=self.outputs[g],
            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in feeds.items()])
        resp = req.exec()
        if resp.has_error():
            raise pb_utils.TritonModelException(f"{model}: {resp.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(resp, n).as_numpy() for n in self.outputs[g]}


class TritonPythonModel:
    def initialize(self, args):
        build = Path(args["model_repository"]) / str(args["model_version"]) / "build"
        self.runner = BlsRunner(build, args["model_name"])
        self.max_seq = int(self.runner.manifest["export"]["max_seq"])

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {}
            for name, *_ in INPUTS:
                t = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = None if t is None else t.as_numpy()
            try:
                image, prompt, max_new = parse_request(inputs, self.max_seq)
                res = self.runner.generate(image, prompt, max_new)
            except UserError as e:  # this request only; the others in the batch are answered
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"error: {e}")))
                continue
            out = answer_outputs(res.tokens, res.text)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in out.items()]))
        return responses
