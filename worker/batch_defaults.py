"""Default batch limits (max_num_seqs, max_num_batched_tokens) from the device, as vLLM's.

vLLM v1 (`EngineArgs.get_batch_defaults`) gives cards with >= 70 GiB of memory (H100,
H200, MI300; not the A100, where the larger token budget measured slower) 1024 sequences
and 16384 tokens per step for the offline `LLM` class, 1024 and 8192 for the API server;
other GPUs 256 sequences and 8192 / 2048 tokens. Ours follow the same split by memory.
CPU keeps small limits: a 512-token step of a 135M model takes about a second there, so
a long prompt is prefilled in such chunks and running streams get tokens between them.
An explicit value (a flag, an `LLM(...)` keyword) always wins.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
LARGE_GPU_BYTES = 70 * GiB  # vLLM's threshold for its large-batch defaults
USAGE_CONTEXTS = ("offline", "server")  # LLM / `bench throughput` / generate vs serve / worker


@dataclass(frozen=True)
class BatchDefaults:
    max_num_seqs: int
    max_num_batched_tokens: int  # with chunked prefill; without, at least max_model_len


CPU_DEFAULTS = BatchDefaults(max_num_seqs=256, max_num_batched_tokens=512)
# Per usage context: (large card, other GPUs).
GPU_DEFAULTS = {
    "offline": (BatchDefaults(1024, 16384), BatchDefaults(256, 8192)),
    "server": (BatchDefaults(1024, 8192), BatchDefaults(256, 8192)),
}


def is_large_gpu(total_memory: int, name: str) -> bool:
    return total_memory >= LARGE_GPU_BYTES and "a100" not in name.lower()


def batch_defaults(
    device_type: str, usage_context: str, total_memory: int = 0, name: str = ""
) -> BatchDefaults:
    """The limits a run gets when neither is given (total_memory, name: the GPU's)."""
    if usage_context not in USAGE_CONTEXTS:
        raise ValueError(
            f"usage_context must be one of {', '.join(USAGE_CONTEXTS)}, got {usage_context!r}"
        )
    if device_type == "cpu":
        return CPU_DEFAULTS
    large, other = GPU_DEFAULTS[usage_context]
    return large if is_large_gpu(total_memory, name) else other


def resolve_batch_limits(
    max_num_seqs: int | None,
    max_num_batched_tokens: int | None,
    defaults: BatchDefaults,
    chunked_prefill: bool,
    max_model_len: int,
) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens): given values as they are, defaults for the
    rest. Without chunked prefill a default budget grows to max_model_len (a prompt is
    prefilled in one step); a default max_num_seqs never exceeds the token budget."""
    tokens = max_num_batched_tokens
    if tokens is None:
        tokens = defaults.max_num_batched_tokens
        if not chunked_prefill:
            tokens = max(tokens, max_model_len)
    seqs = max_num_seqs if max_num_seqs is not None else min(defaults.max_num_seqs, tokens)
    return seqs, tokens


def device_batch_defaults(device: object, usage_context: str) -> BatchDefaults:
    """batch_defaults for a torch.device (reads the card's memory and name)."""
    import torch

    assert isinstance(device, torch.device)
    if device.type != "cuda":
        return batch_defaults(device.type, usage_context)
    props = torch.cuda.get_device_properties(device)
    return batch_defaults("cuda", usage_context, props.total_memory, props.name)
