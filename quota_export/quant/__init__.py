"""Quantizer primitives, rotation, weight algorithms (RTN, GPTQ), KV-cache quantizer."""
