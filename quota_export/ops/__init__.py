"""The deployed model's primitives, each with its torch form and its ONNX form side by side.

`reference.Deployed` (the model in torch) and `lower.decoder.DecoderLowering` (the graphs)
compose these and restate none of them; calibration calls `Deployed`. Each module's docstring
gives the formula and the subgraph; tests/ops/ checks each torch form against its ONNX form on
ONNX Runtime (bit for bit where the contract says so).

    base        Emit (graph + reductions' precision + target), hp_dtype
    graph       the ONNX graph builder (stable hierarchical node names)
    norm        RMSNorm
    act_quant   per-token activation quantization (4/8-bit)
    linear      the quantized linear (integer activations x DQ(int4/int8 weights), exact sums)
    kv_cache    KV-cache quantization, 4-bit packing, the boundary format
    rope        RoPE / M-RoPE
    attention   attention with grouped KV heads, causal mask, key bias
    swiglu      the gated MLP activation
    rotate      the online Hadamard rotation (quant.activations.rotation: hadamard)
    signals     the stage signals (magnitude, attention, risk, diversity), the code cosine, the score
    maxmin      max-min (DivPrune-style) selection as a score
    merge       merged-token counts and their key bias
    gather      the stage's top-k row gather (standard ops or the quota::TokenGather plugin node)
"""
