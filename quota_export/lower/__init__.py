"""Lowering: recipe + model -> ONNX graphs (one module per target) and TensorRT checks."""
