"""Engine flags, named as vLLM names them, shared by every command that starts an engine."""

from __future__ import annotations

import argparse

from ipc.messages import KV_COMPRESSION_METHODS
from worker.config import (
    DEVICES,
    DTYPES,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    QUANTIZATIONS,
    EngineConfig,
)


def add_engine_args(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", required=model_required, help="HF model folder or .gguf file")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    g.add_argument("--served-model-name", default=None, help="model name clients send")
    g.add_argument("--dtype", default="auto", choices=DTYPES)
    g.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    g.add_argument("--device", default="auto", choices=DEVICES)
    g.add_argument(
        "--quantization",
        default=None,
        choices=QUANTIZATIONS,
        help="fp8: FP8 weights (quantized on load unless the checkpoint is FP8); awq, gptq: "
        "4-bit weights of an AWQ / GPTQ checkpoint (or random ones with --load-format dummy)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="auto: the model's dtype; fp8 (fp8_e4m3): half the bytes, twice the blocks",
    )
    g.add_argument("--seed", type=int, default=0)
    _add_parallel_args(g)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument(
        "--num-gpu-blocks-override", type=int, default=None, help="KV blocks (skip sizing)"
    )
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        default=None,
        help="KV cache size in GiB (on a GPU it replaces --gpu-memory-utilization's sizing; "
        "default 1 on CPU)",
    )
    _add_batch_args(g)
    g.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="split long prompts across steps",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of shared prompt prefixes",
    )
    g.add_argument("--enforce-eager", action="store_true", help="never use CUDA graphs")
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="schedule and launch the next step while the GPU runs this one (on by default; "
        "--no-async-scheduling steps synchronously)",
    )
    g.add_argument("--max-logprobs", type=int, default=20)
    g.add_argument("--speculative-method", default=None, choices=["ngram", "draft"])
    g.add_argument("--speculative-model", default=None, help="draft model folder")
    g.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=0,
        help="tokens proposed per step (default 4 when a method or draft model is given)",
    )
    g.add_argument("--ngram-prompt-lookup-min", type=int, default=1)
    g.add_argument("--ngram-prompt-lookup-max", type=int, default=4)
    g.add_argument(
        "--generation-config",
        default="auto",
        choices=["auto", "vllm"],
        help="auto: unset request fields take the model's generation_config.json values "
        "(temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens); vllm: ignore it",
    )
    add_kv_compression_args(g)


def add_kv_compression_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--kv-compression",
        default=None,
        choices=KV_COMPRESSION_METHODS,
        help="compress each long prompt's KV cache after its prefill (off by default; "
        "streaming is the sinks + recent tokens baseline)",
    )
    g.add_argument(
        "--kv-compression-budget",
        type=float,
        default=0.25,
        help="KV kept per layer and KV head, the window included: a ratio of the prompt in "
        "(0, 1), or a token count (default 0.25: 4x smaller)",
    )
    g.add_argument(
        "--kv-compression-window",
        type=int,
        default=64,
        help="observation window: the prompt's last W queries score the earlier positions "
        "(64: it must cover the question)",
    )
    g.add_argument(
        "--kv-compression-min-prompt-len",
        type=int,
        default=256,
        help="prompts shorter than this are never compressed",
    )


def _add_batch_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="requests per step at most (default by device: 1024 on GPUs with >= 70 GiB, "
        "256 on other GPUs and CPU, as vLLM)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per step at most (default: 16384 offline / 8192 serving on GPUs with "
        ">= 70 GiB, 8192 on other GPUs, 512 on CPU)",
    )


def _add_parallel_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "-tp",
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split the model across N GPUs (N processes; on CPU, gloo): a leader and "
        "N-1 followers",
    )


def engine_config_from_args(
    args: argparse.Namespace, usage_context: str = "server"
) -> EngineConfig:
    """Build and validate an EngineConfig; raises ValueError naming the bad flag.
    `usage_context` "offline" (generate, bench) takes vLLM's offline batch defaults."""
    method = args.speculative_method
    if args.speculative_model and method is None:
        method = "draft"
    num_spec = args.num_speculative_tokens
    if method is not None and num_spec == 0:
        num_spec = 4  # a speculative method with no count: vLLM-like default
    config = EngineConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        load_format=args.load_format,
        device=args.device,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        seed=args.seed,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks_override,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.enable_chunked_prefill,
        enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        max_logprobs=args.max_logprobs,
        speculative_method=method,
        speculative_model=args.speculative_model,
        num_speculative_tokens=num_spec,
        ngram_prompt_lookup_min=args.ngram_prompt_lookup_min,
        ngram_prompt_lookup_max=args.ngram_prompt_lookup_max,
        generation_config=args.generation_config,
        kv_compression=args.kv_compression,
        kv_compression_budget=args.kv_compression_budget,
        kv_compression_window=args.kv_compression_window,
        kv_compression_min_prompt_len=args.kv_compression_min_prompt_len,
        tensor_parallel_size=args.tensor_parallel_size,
        usage_context=usage_context,
    )
    try:
        config.validate()
    except ValueError as e:
        raise ValueError(f"invalid engine flag: {e}") from None
    return config
