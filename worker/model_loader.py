"""Building a model and filling its weights: from a checkpoint, or random (dummy)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ipc.model_folder import ModelFiles
from worker import progress
from worker.attention import AttentionBackend
from worker.model_config import ModelConfig
from worker.models.base import CausalLM
from worker.models.falcon import FalconForCausalLM
from worker.models.gpt_neox import GPTNeoXForCausalLM
from worker.models.layers import number_layers
from worker.models.llama import LlamaForCausalLM
from worker.models.mixtral import MixtralForCausalLM
from worker.parallel.layers import shard_model
from worker.parallel.loader import iter_shard_weights
from worker.parallel.plan import ShardPlan
from worker.parallel.state import TpGroup
from worker.quant.config import Fp8Scheme
from worker.quant.fp8 import Fp8Linear, cast_model, fill_dummy_fp8, gemm_mode
from worker.quant.int4_linear import Int4Linear, fill_dummy_int4, prepare_int4_layers
from worker.quant.scheme import QuantScheme
from worker.weights import iter_weights

log = logging.getLogger(__name__)

_DTYPE_NAMES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


ModelFactory = Callable[[ModelConfig, AttentionBackend, int], CausalLM]

# config.json architecture -> the class that runs it (model_config.py lists what parses).
MODEL_CLASSES: dict[str, ModelFactory] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "FalconForCausalLM": FalconForCausalLM,
    "GPTNeoXForCausalLM": GPTNeoXForCausalLM,
}


def model_class(config: ModelConfig) -> ModelFactory:
    """The class for config's architecture, called as cls(config, backend, max_positions)."""
    return MODEL_CLASSES[config.architecture]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """auto: float32 on CPU; on GPU the checkpoint's 16-bit type, else bfloat16."""
    if name != "auto":
        return _DTYPE_NAMES[name]
    if device.type == "cpu":
        return torch.float32
    ckpt = _DTYPE_NAMES.get(checkpoint_dtype or "")
    return ckpt if ckpt in (torch.float16, torch.bfloat16) else torch.bfloat16


def build_model(
    files: ModelFiles,
    config: ModelConfig,
    backend: AttentionBackend,
    max_positions: int,
    device: torch.device,
    dtype: torch.dtype,
    dummy: bool,
    seed: int = 0,
    quant: QuantScheme | None = None,
    group: TpGroup | None = None,
) -> CausalLM:
    # Build on the meta device, then materialize directly on the target: no CPU copy of
    # the weights is ever made for a GPU model, and each checkpoint tensor is copied once.
    # FP8 and 4-bit layers are quantized from the start (never a 16-bit copy first: a 70B
    # model fits). Tensor parallel (`group` of 2+ ranks): the rank's share of the layers,
    # and of the checkpoint (worker/parallel/).
    if isinstance(quant, Fp8Scheme) and device.type == "cuda":
        gemm_mode(device)  # fails early, naming the card, on a GPU without FP8
    plan = None
    if group is not None and group.size > 1:
        plan = ShardPlan.make(config, group.rank, group.size)
    with torch.device("meta"):
        model = model_class(config)(
            config if plan is None else plan.rank_config(config), backend, max_positions
        )
        if plan is not None:
            shard_model(model, plan, group)  # type: ignore[arg-type]
        if quant is not None:
            model.quantize(quant)
        # Cast while still on meta, so to_empty allocates the final dtype: a float32 copy
        # first would need twice the memory (Mixtral-8x7B: 187 GB, past an H200).
        cast_model(model, dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    if dummy:
        fill_dummy_weights(model, seed)
    else:
        with torch.no_grad():
            total = sum(1 for _ in model.parameters())
            tensors = iter_weights(files) if plan is None else iter_shard_weights(files, plan)
            weights = progress.bar(tensors, total, "tensors")
            model.load_weights(weights, source=files.path)
    prepare_int4_layers(model, dtype, device)  # 4-bit: layout, one prefill dequant buffer
    model.rotary.build(device)
    number_layers(model)
    model.eval()
    return model


@torch.no_grad()
def fill_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights of the real shapes, small enough that activations stay finite."""
    gens: dict[torch.device, torch.Generator] = {}

    def gen_for(device: torch.device) -> torch.Generator:
        if device not in gens:
            gens[device] = torch.Generator(device=device).manual_seed(seed)
        return gens[device]

    done: set[int] = set()  # quantized layers' parameters, filled in their own format
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            fill_dummy_fp8(module, gen_for(module.weight.device), 0.02)
        elif isinstance(module, Int4Linear):
            fill_dummy_int4(module, gen_for(module.qweight.device), 0.02)
            done.update(id(p) for n, p in module.named_parameters() if n != "bias")
    for name, p in model.named_parameters():
        if p.dtype == torch.float8_e4m3fn or name.endswith(("weight_scale", "input_scale")):
            continue
        if id(p) in done:
            continue
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        if name.endswith("norm.bias"):
            p.zero_()
            continue
        p.data.uniform_(-0.02, 0.02, generator=gen_for(p.device))
