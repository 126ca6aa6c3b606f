"""Quantized weights and KV caches: FP8 (e4m3) on Hopper, each with a CPU reference.

`config` (no torch) reads a checkpoint's quantization_config; `fp8` holds the FP8 math and
the `Fp8Linear` layer; `kv` resolves the KV cache element type.
"""
