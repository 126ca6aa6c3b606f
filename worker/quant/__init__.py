"""Quantized weights and KV caches: formats, loaders and their linear layers.

`config` (no torch) reads a checkpoint's FP8 quantization_config; `fp8` holds the FP8
math and the `Fp8Linear` layer; `kv` resolves the KV cache element type; `int4` the AWQ /
GPTQ 4-bit formats. Each has a CPU reference (dequantize, then compute).
"""
