"""FP8 (e4m3) linear layers: weights in float8 with fp32 scales, activations quantized at
run time.

    y[T, N] = (xq[T, K] @ wq[N, K]^T) * x_scale[T, 1] * w_scale[1, N]  (+ bias)

Weights keep one scale per output channel (a per-tensor checkpoint scale is broadcast to
its rows, so fused q/k/v or gate/up layers can hold shards with different scales).
Activations get one scale per token (dynamic), or the checkpoint's static input_scale.

GPU (sm_89+): batches of 1-8 rows (decode at small batch: a weight read) run our FP8
GEMV (cuda/fp8_gemv.py: 16-bit activations as they are, weights widened in registers;
HEADRACE_FP8_GEMV=old: the first kernel, 1-4 rows; =0 turns it off). Larger ones: torch._scaled_mm (cuBLASLt FP8 tensor
cores, fp32 accumulate) with row-wise scales, after the activation-quantization kernel
(cuda/fp8_quant.py). The path is picked once per device by a probe (`gemm_mode`); shapes
_scaled_mm rejects (K or N not a multiple of 16) dequantize the weight instead.
CPU: `fp8_linear_ref`, the same math in fp32.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
from torch import nn

from cuda.fp8_gemv import fp8_gemv, gemv_ok
from cuda.fp8_quant import FP8, FP8_MAX, MIN_SCALE, quantize_per_token, quantize_per_token_ref

log = logging.getLogger(__name__)

_modes: dict[int, str] = {}

# cuBLASLt's FP8 "fast accumulation" (CUBLASLT_MATMUL_DESC_FAST_ACCUM): the tensor cores'
# partial sums are not promoted to fp32 registers every few k-steps, as in vLLM's CUTLASS
# FP8 kernels on sm_90. On the H200 (scripts/bench_fp8_accum.py) the four Llama-3-8B GEMMs
# of a layer ran 9% faster at 880 rows and 5% at 16k, and W2 FP8 4.6% faster; the error
# against the fp32 product grew from 0.17% of the output's rms (the bf16 output's rounding)
# to 0.21% (K = 4096) and 0.33% (K = 14336). It stays opt-in (HEADRACE_FP8_FAST_ACCUM=1):
# with it SmolLM2-135M's bf16 greedy answer to issue 13's question no longer says Paris
# (perplexity +2.16% against +2.36% without; fp32: +1.80% / +2.11%, Paris both ways).
FAST_ACCUM = os.environ.get("HEADRACE_FP8_FAST_ACCUM", "0") == "1"


class Fp8UnsupportedError(ValueError):
    """The GPU has no FP8 tensor cores."""


# ---- quantizing weights ----------------------------------------------------------------------
def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (wq [N, K] float8_e4m3fn, scales [N] fp32), w ~= wq * scales[:, None]."""
    wf = w.float()
    scales = (wf.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
    return (wf / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


def quantize_weight_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (wq [N, K] float8_e4m3fn, scale [] fp32)."""
    wf = w.float()
    scale = (wf.abs().amax() / FP8_MAX).clamp(min=MIN_SCALE)
    return (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_weight(wq: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """wq [N, K] fp8, scales [N] / [N, 1] / [] / [1] -> fp32 [N, K]."""
    s = scales.float()
    if s.numel() > 1:
        s = s.reshape(-1, 1)
    return wq.float() * s


# ---- the matmul ------------------------------------------------------------------------------
class Fp8Input(NamedTuple):
    """An Fp8Linear's input, quantized per token ahead of the layer by the kernel that wrote
    it (cuda/norm_quant.py): what quantize_per_token would give, bit for bit."""

    xq: torch.Tensor  # [T, K] float8_e4m3fn
    scales: torch.Tensor  # [T, 1] fp32


def fp8_matmul_ref(
    xq: torch.Tensor,
    xs: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(xq * xs) @ dequantized weight^T (+ bias) in fp32, rounded to dtype."""
    y = (xq.float() * xs) @ dequantize_weight(weight, weight_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def fp8_linear_ref(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N, K] fp8
    weight_scale: torch.Tensor,  # [N] fp32
    input_scale: torch.Tensor | None,  # [1] fp32 (static), None = dynamic per token
    bias: torch.Tensor | None,  # [N]
) -> torch.Tensor:
    """The reference: quantize x as the GPU does, dequantize both, matmul in fp32."""
    xq, xs = quantize_per_token_ref(x, input_scale)
    return fp8_matmul_ref(xq, xs, weight, weight_scale, bias, x.dtype)


def gemm_mode(device: torch.device) -> str:
    """How this GPU runs FP8 GEMMs: 'rowwise' (_scaled_mm with per-token x per-channel
    scales), 'tensorwise' (_scaled_mm with one activation scale, the weight scales applied
    after) or 'dequant' (no FP8 GEMM: weights dequantized per call). Raises
    Fp8UnsupportedError below compute capability 8.9."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    mode = _modes.get(idx)
    if mode is not None:
        return mode
    check_fp8_gpu(idx)
    a = torch.ones((3, 32), device=device).to(FP8)
    b = torch.ones((32, 32), device=device).to(FP8)
    one = torch.ones((), device=device)
    mode = "dequant"
    try:
        sa = torch.ones((3, 1), device=device)
        sb = torch.ones((1, 32), device=device)
        y = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        if bool((y == 32).all()):
            mode = "rowwise"
    except RuntimeError as e:
        log.info("_scaled_mm row-wise scaling unavailable: %s", e)
    if mode == "dequant":
        try:
            torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            mode = "tensorwise"
        except RuntimeError as e:
            log.warning("_scaled_mm unavailable (%s): FP8 weights are dequantized per call", e)
    _modes[idx] = mode
    log.info("FP8 GEMM path on %s: %s", torch.cuda.get_device_name(idx), mode)
    return mode


def check_fp8_gpu(device_index: int) -> None:
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device_index)
        raise Fp8UnsupportedError(
            f"--quantization fp8 needs FP8 tensor cores (compute capability 8.9 or newer: "
            f"Ada, Hopper); {name} has compute capability {major}.{minor}"
        )


def fp8_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K] fp8
    weight_scale: torch.Tensor,  # [N] fp32
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    n = weight.shape[0]
    if not x.is_cuda:
        y = fp8_linear_ref(x2, weight, weight_scale, input_scale, bias)
    else:
        y = _fp8_linear_cuda(x2, weight, weight_scale, input_scale, bias)
    return y.reshape(*lead, n)


def _fp8_linear_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    if not x.is_contiguous():
        x = x.contiguous()
    if uses_gemv(x, weight):
        return fp8_gemv(x, weight, weight_scale, bias)
    mode = gemm_mode(x.device)
    n = weight.shape[0]
    if mode == "dequant" or not _gemm_shape_ok(x, weight):
        w = dequantize_weight(weight, weight_scale).to(x.dtype)
        return torch.nn.functional.linear(x, w, bias)
    if mode == "rowwise":
        xq, xs = quantize_per_token(x, input_scale)
        return scaled_mm_rowwise(xq, xs, weight, weight_scale, bias, x.dtype)
    else:  # tensorwise: one scale for the whole activation, weight scales after the GEMM
        if input_scale is None:
            xs = (x.abs().amax().float() / FP8_MAX).clamp(min=MIN_SCALE)
        else:
            xs = input_scale.reshape(())
        xq = (x.float() / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        one = torch.ones((), device=x.device)
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=one, out_dtype=torch.float32)
        y = y * weight_scale.view(1, n)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def _gemm_shape_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return k % 16 == 0 and n % 16 == 0 and x.shape[0] > 0


def quantizes_per_token(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp8_linear(x, weight, ...) on this GPU tensor runs quantize_per_token(x, input_scale),
    then the row-wise _scaled_mm: not the GEMV (<= 8 rows under HEADRACE_FP8_GEMV's mode),
    not the dequantized or tensor-wise fallbacks. x: [M, K] contiguous, as the layer gets it."""
    return (
        x.dim() == 2
        and x.is_contiguous()
        and not uses_gemv(x, weight)
        and _gemm_shape_ok(x, weight)
        and gemm_mode(x.device) == "rowwise"
    )


def scaled_mm_rowwise(
    xq: torch.Tensor,  # [T, K] fp8
    xs: torch.Tensor,  # [T, 1] fp32
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    n = weight.shape[0]
    y = torch._scaled_mm(
        xq,
        weight.t(),
        scale_a=xs,
        scale_b=weight_scale.view(1, n),
        out_dtype=torch.bfloat16,
        use_fast_accum=FAST_ACCUM,
    )
    if bias is not None:
        y = y + bias
    return y.to(dtype)


def silu_mul_fp8_linear(gate_up: torch.Tensor, layer: Fp8Linear) -> torch.Tensor:
    """layer(silu_and_mul(gate_up)) for a [T, 2I] gate_up. Where the layer runs the
    row-wise _scaled_mm (GPU, more rows than the GEMV takes), the activation quantization
    is fused into the SiLU kernel (cuda/fp8_fused.cu: h is never written in 16 bits);
    elsewhere (CPU, the GEMV at small batch, HEADRACE_FP8_FUSED=0) the two steps as before."""
    from cuda import fp8_fused
    from cuda.fused_ops import silu_and_mul

    w = layer.weight
    n, k = w.shape
    fused = (
        fp8_fused.ENABLED
        and fp8_fused.kernel_ok(gate_up)
        and gate_up.shape[1] == 2 * k
        and not gemv_ok(gate_up[:, :k], w)  # M <= 8: the GEMV reads x unquantized
        and n % 16 == 0
        and k % 16 == 0
        and gemm_mode(gate_up.device) == "rowwise"
    )
    if not fused:
        return layer(silu_and_mul(gate_up))
    xq, xs = fp8_fused.silu_mul_quant(gate_up, layer.input_scale)
    return scaled_mm_rowwise(xq, xs, w, layer.weight_scale, layer.bias, gate_up.dtype)


def uses_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """This [M, K] activation runs the GEMV (weight-only math), not _scaled_mm."""
    return gemv_ok(x, weight)


class Fp8Linear(nn.Module):
    """nn.Linear's interface with float8_e4m3fn weights and fp32 per-channel scales."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, static_input: bool = False
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.ones(out_features, dtype=torch.float32), requires_grad=False
        )
        # Static activations: one scale (the max of the shards' input_scale when fused).
        self.input_scale = (
            nn.Parameter(torch.zeros(1, dtype=torch.float32), requires_grad=False)
            if static_input
            else None
        )
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, x_fp8: Fp8Input | None = None) -> torch.Tensor:
        """x_fp8: x already quantized per token (with input_scale where static), given only
        where `takes_fp8_input(x)` said so."""
        if x_fp8 is None:
            return fp8_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias)
        xq, xs = x_fp8
        if not x.is_cuda:
            return fp8_matmul_ref(xq, xs, self.weight, self.weight_scale, self.bias, x.dtype)
        return scaled_mm_rowwise(xq, xs, self.weight, self.weight_scale, self.bias, x.dtype)

    def takes_fp8_input(self, x: torch.Tensor) -> bool:
        """Whether forward(x) quantizes x per token for the row-wise _scaled_mm, so a kernel
        that writes x may hand over its quantization instead (x: the tensor forward will
        get, or one of its shape, dtype, strides and 16-byte alignment)."""
        return (
            x.is_cuda
            and x.dtype in (torch.bfloat16, torch.float16)
            and (quantizes_per_token(x, self.weight))
        )

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """self(silu_and_mul(gate_up)), the activation quantization fused where it pays."""
        return silu_mul_fp8_linear(gate_up, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8 e4m3"


def cast_model(model: nn.Module, dtype: torch.dtype) -> None:
    """model.to(dtype), except FP8 weights and their fp32 scales (nn.Module.to would cast
    float8 too: it counts as floating point), and integer (4-bit packed) parameters and
    the fp16 scales of any module that says its parameters keep their dtype."""
    for module in model.modules():
        keep = getattr(module, "KEEPS_PARAM_DTYPES", False)
        for name, p in module._parameters.items():
            if p is None or p.dtype == FP8 or not p.dtype.is_floating_point:
                continue
            if (isinstance(module, Fp8Linear) or keep) and name != "bias":
                continue
            p.data = p.data.to(dtype)


@torch.no_grad()
def fill_dummy_fp8(layer: Fp8Linear, gen: torch.Generator, amplitude: float) -> None:
    """Random FP8 weights equal to uniform(-amplitude, amplitude), made a slice at a time:
    no full-size 16/32-bit copy of the weight ever exists (a 70B model fits an H200)."""
    w = layer.weight.data
    rows_per_chunk = max(1, (1 << 26) // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], rows_per_chunk):
        dst = w[r0 : r0 + rows_per_chunk]
        chunk = torch.empty(dst.shape, dtype=torch.float32, device=w.device)
        chunk.uniform_(-FP8_MAX, FP8_MAX, generator=gen)
        dst.copy_(chunk.to(FP8))
        del chunk
    layer.weight_scale.data.fill_(amplitude / FP8_MAX)
    if layer.input_scale is not None:
        layer.input_scale.data.fill_(1.0 / FP8_MAX)  # dummy activations stay within +-1
