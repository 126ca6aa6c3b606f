"""Quantized weights: formats, loaders and their linear layers."""
