"""Int4Linear: nn.Linear's interface over 4-bit weights (AWQ / GPTQ checkpoints, W4A16).

Parameters, in the kernels' layout (worker/quant/int4_repack.py converts at load)::

    qweight  int32 [N, K / 8]   8 inputs of one output channel per word
    scales   fp16  [N, G]       G = K / group_size
    zeros    uint8 [N, G]
    perm     int64 [K]          GPTQ desc_act only: x[:, perm] is in group order
    bias     model dtype [N]    if the layer has one

Fused q/k/v and gate/up layers hold their shards' rows back to back, as 16-bit ones do.

GPU: cuda/int4_gemm.int4_linear: the W4A16 GEMV for a few rows (decode), else the weight
dequantized into one scratch buffer shared by every Int4Linear of the model (the size of
the largest layer, so prefill never holds more than one 16-bit weight) and a cuBLAS
matmul. `prepare_int4_layers` makes that buffer after loading and, with
HEADRACE_INT4_LAYOUT=tiles, reorders qweight for the tensor-core GEMV (cuda/int4_tiles.py),
or with HEADRACE_INT4_GEMV=v4 (the default; weights up to HEADRACE_INT4_STREAM_MAX) into
round 4's stream layout (cuda/int4_v4_gemv.py). CPU: the reference (dequantize, then
matmul), with the dequantized weight
kept while it is small (the CPU path serves tests and tiny models).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from cuda import int4_gemm, int4_gemv, int4_v4_gemv
from cuda.int4_gemm import Int4Weight, dequantize_ref, int4_linear
from cuda.int4_tiles import tiles_ok, to_tiles
from worker.quant.int4 import PACK, Int4Config

CPU_CACHE_BYTES = 64 << 20  # keep a layer's dequantized weight on CPU up to this size
# "rows" or "tiles" (cuda/int4_tiles.py: the tensor-core GEMV's order), chosen on the GPU.
LAYOUT = os.environ.get("HEADRACE_INT4_LAYOUT", "rows")


class Int4Linear(nn.Module):
    KEEPS_PARAM_DTYPES = True  # fp8.cast_model leaves all but the bias as they are

    def __init__(
        self, in_features: int, out_features: int, bias: bool, cfg: Int4Config, name: str = ""
    ) -> None:
        super().__init__()
        group = cfg.group_for(in_features)
        where = f" of {name}" if name else ""
        if in_features % PACK or in_features % group:
            raise ValueError(
                f"quantization_config.group_size {cfg.group_size} does not divide in_features "
                f"{in_features}{where} (and in_features must be a multiple of {PACK})"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.cfg = cfg
        self.group_size = group
        groups = in_features // group

        def param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.qweight = param(out_features, in_features // PACK, dtype=torch.int32)
        self.scales = param(out_features, groups, dtype=torch.float16)
        self.zeros = param(out_features, groups, dtype=torch.uint8)
        self.perm = param(in_features, dtype=torch.int64) if cfg.desc_act else None
        self.reorders = False  # perm holds a real order (set by the loader)
        self.layout = "rows"  # qweight's order; "tiles" after use_tiles(), "stream" use_stream()
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.scratch: torch.Tensor | None = None  # shared [>= N*K] dequant buffer (GPU)
        self._cpu_weight: torch.Tensor | None = None

    def int4_weight(self) -> Int4Weight:
        perm = self.perm if self.reorders else None
        return Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, perm, self.layout)

    @torch.no_grad()
    def use_tiles(self) -> bool:
        """Reorder qweight into the tiles layout, in place, if the shape allows it."""
        if self.layout == "tiles" or not tiles_ok(
            self.out_features, self.in_features, self.group_size
        ):
            return self.layout == "tiles"
        self.qweight.data.copy_(to_tiles(self.qweight.data))
        self.layout = "tiles"
        self.weights_changed()
        return True

    @torch.no_grad()
    def use_stream(self) -> bool:
        """Reorder qweight into round 4's stream layout (HEADRACE_INT4_GEMV=v4), in place,
        if the shape allows it; the other shapes keep rows and the default GEMV."""
        w = self.int4_weight()
        if (
            self.layout == "stream"
            or self.layout != "rows"
            or not int4_v4_gemv.supported(w.out_features, w.in_features, w.group_size)
        ):
            return self.layout == "stream"
        self.qweight.data.copy_(int4_v4_gemv.to_stream(self.qweight.data))
        self.layout = "stream"
        self.weights_changed()
        return True

    def weights_changed(self) -> None:
        """Forget the CPU's dequantized copy (the loader calls this after writing rows)."""
        self._cpu_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if x.is_cuda:
            y = int4_linear(x2.contiguous(), self.int4_weight(), self._scratch(x.dtype))
        else:
            y = self._cpu_forward(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _scratch(self, dtype: torch.dtype) -> torch.Tensor | None:
        n = self.out_features * self.in_features
        s = self.scratch
        if s is None or s.dtype != dtype or s.numel() < n:
            return None
        return s[:n].view(self.out_features, self.in_features)

    def _cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._cpu_weight
        if w is None or w.dtype != x.dtype:
            w = dequantize_ref(self.int4_weight(), x.dtype)  # [N, K], inputs in perm order
            small = w.numel() * w.element_size() <= CPU_CACHE_BYTES
            self._cpu_weight = w if small else None
        if self.reorders:
            assert self.perm is not None
            x = x.index_select(-1, self.perm)
        return F.linear(x, w)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.cfg.describe()}"


def int4_layers(model: nn.Module) -> list[Int4Linear]:
    return [m for m in model.modules() if isinstance(m, Int4Linear)]


def prepare_int4_layers(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """After the weights are in (GPU only): the tiles layout where it is asked for
    (HEADRACE_INT4_LAYOUT=tiles) and the shape allows, and one dequantization buffer for
    every Int4Linear, sized for the largest; returns its bytes. Allocated before the memory
    profile and CUDA graph capture, so both see it."""
    layers = int4_layers(model)
    if not layers or device.type != "cuda":
        return 0
    if LAYOUT == "tiles":
        for m in layers:
            m.use_tiles()
    elif int4_gemm.GEMV_IMPL == "v4":
        for m in layers:  # the largest matrices run round 3 faster (cuda/int4_gemm.py)
            if m.out_features * m.in_features <= int4_gemm.STREAM_MAX_WEIGHTS:
                m.use_stream()
    int4_gemv.workspace(device)  # the split GEMV's partials, before any graph capture
    size = max(m.out_features * m.in_features for m in layers)
    buf = torch.empty(size, dtype=dtype, device=device)
    for m in layers:
        m.scratch = buf
    return buf.numel() * buf.element_size()


@torch.no_grad()
def fill_dummy_int4(layer: Int4Linear, gen: torch.Generator, amplitude: float) -> None:
    """Random 4-bit weights made in place (no 16-bit copy ever exists: a 70B model fits):
    uniform nibbles, zero point 8, scale amplitude / 8, so W lies in [-amplitude, amplitude)
    like the 16-bit dummies."""
    layer.qweight.data.random_(-(2**31), 2**31, generator=gen)
    layer.zeros.data.fill_(8)
    layer.scales.data.fill_(amplitude / 8)
    layer.reorders = False
    layer.weights_changed()
