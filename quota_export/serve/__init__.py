"""Serving the built graphs with Triton Inference Server.

    protocol.py     the one model's inputs / outputs (image bytes, prompt, max_new_tokens ->
                    answer, tokens) and request checking, shared by both servers below
    pytriton_server.py  `serve`: PyTriton (a real tritonserver) with OrtRunner.generate behind it
    stub_env.py     the PyTriton Python-backend stub workaround (matching libpython, numpy < 2)
    repository.py   `export-triton`: a model repository for a full tritonserver (ONNX Runtime
                    backend per graph, the generate loop in a Python BLS model)
    bls_model.py    that BLS model (model.py of the entry model)
    client.py       a tritonclient helper (HTTP or gRPC) used by the tests and the load benchmark
"""
