"""Engine configuration: what the CLI flags and `LLM(...)` keyword arguments become.

Pure Python (no torch): the scheduler and KV cache manager read these too. Every field has
one line of doc; `validate()` raises ValueError naming the field and the allowed range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ipc.messages import KV_COMPRESSION_METHODS, check_kv_budget
from ipc.model_folder import LOAD_FORMATS
from worker.batch_defaults import USAGE_CONTEXTS

DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("fp8", "awq", "gptq")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes one engine (one worker)."""

    model: str  # a Hugging Face model folder, a .gguf file, or a folder holding one
    tokenizer: str | None = None  # defaults to the model's own
    served_model_name: str | None = None  # the name clients send; defaults to `model`
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's 16-bit type (or bf16) on GPU
    load_format: str = "auto"  # auto, safetensors, gguf or dummy (random weights)
    device: str = "auto"  # auto picks cuda when available
    quantization: str | None = None  # fp8, awq or gptq (a quantized checkpoint implies its own)
    kv_cache_dtype: str = "auto"  # auto = the model's dtype; fp8 (= fp8_e4m3): 1 byte/element
    seed: int = 0  # seeds dummy weights and unseeded sampling
    max_model_len: int | None = None  # context length; defaults to the model's
    block_size: int = 16  # tokens per KV cache block
    num_gpu_blocks: int | None = None  # KV blocks; overrides the memory-based sizing
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory the worker may use
    # KV cache size when num_gpu_blocks is unset; on a GPU it replaces the sizing from
    # gpu_memory_utilization (None: that sizing; 1 GiB on CPU).
    kv_cache_memory_gb: float | None = None
    # Requests in one step at most, and the token budget per step; None: by the device
    # (worker/batch_defaults.py: 1024 and 16384 offline / 8192 serving on cards with
    # >= 70 GiB, as vLLM; 256 and 8192 on other GPUs; 256 and 512 on CPU).
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    usage_context: str = "server"  # "offline" (LLM, bench, generate) or "server": defaults
    enable_chunked_prefill: bool = True  # split long prompts across steps
    enable_prefix_caching: bool = True  # reuse KV of identical prompt prefixes
    enforce_eager: bool = False  # never use CUDA graphs
    async_scheduling: bool = True  # schedule and launch step N+1 before reading step N's
    max_logprobs: int = 20  # the largest logprobs / prompt_logprobs a request may ask for
    speculative_method: str | None = None  # None, "ngram" or "draft"
    speculative_model: str | None = None  # draft model folder (implies method "draft")
    num_speculative_tokens: int = 0  # tokens proposed per step when speculating
    ngram_prompt_lookup_min: int = 1  # shortest n-gram matched by the ngram proposer
    ngram_prompt_lookup_max: int = 4  # longest n-gram matched by the ngram proposer
    generation_config: str = "auto"  # auto: the model's generation_config.json sets defaults
    kv_compression: str | None = None  # None (off), snapkv, pyramidkv or streaming (baseline)
    kv_compression_budget: float = 0.25  # ratio of the prompt in (0, 1), or tokens kept per layer
    kv_compression_window: int = 64  # observation window: the prompt's last queries that score
    kv_compression_min_prompt_len: int = 256  # shorter prompts are never compressed
    tensor_parallel_size: int = 1  # ranks (GPUs) one model is split across; 1 = no split
    extra: dict[str, str] = field(default_factory=dict)  # free-form, for experiments

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}"
            )
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(
                f"block_size must be a power of two in [1, 128], got {self.block_size}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        self._validate_batch()
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")
        if self.speculative_method not in (None, "ngram", "draft"):
            raise ValueError(
                f"speculative_method must be 'ngram' or 'draft', got {self.speculative_method!r}"
            )
        if not 0 <= self.num_speculative_tokens <= 16:
            raise ValueError(
                f"num_speculative_tokens must be in [0, 16], got {self.num_speculative_tokens}"
            )
        speculating = self.speculative_method is not None or self.speculative_model is not None
        if self.num_speculative_tokens and not speculating:
            raise ValueError(
                "num_speculative_tokens needs a proposer: speculative_method 'ngram' or "
                "speculative_model PATH (a draft model)"
            )
        if speculating and not self.num_speculative_tokens:
            raise ValueError("speculative decoding needs num_speculative_tokens >= 1")
        if self.speculative_method == "ngram" and self.speculative_model is not None:
            raise ValueError(
                "speculative_model is a draft model; it cannot be used with speculative_method "
                "'ngram' (leave the method out, or set it to 'draft')"
            )
        if self.speculative_method == "draft" and self.speculative_model is None:
            raise ValueError("speculative_method 'draft' needs speculative_model (a model folder)")
        if self.generation_config not in ("auto", "vllm"):
            raise ValueError(
                f"generation_config must be 'auto' or 'vllm', got {self.generation_config!r}"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 1 <= self.ngram_prompt_lookup_min <= self.ngram_prompt_lookup_max:
            raise ValueError(
                "ngram_prompt_lookup_min must be >= 1 and <= ngram_prompt_lookup_max, got "
                f"{self.ngram_prompt_lookup_min} and {self.ngram_prompt_lookup_max}"
            )

        self._validate_kv_compression()

    def _validate_batch(self) -> None:
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.usage_context not in USAGE_CONTEXTS:
            raise ValueError(
                f"usage_context must be one of {', '.join(USAGE_CONTEXTS)}, "
                f"got {self.usage_context!r}"
            )
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )

    def _validate_kv_compression(self) -> None:
        if self.kv_compression is not None and self.kv_compression not in KV_COMPRESSION_METHODS:
            raise ValueError(
                f"kv_compression must be one of {', '.join(KV_COMPRESSION_METHODS)}, "
                f"got {self.kv_compression!r}"
            )
        if not 1 <= self.kv_compression_window <= 4096:
            raise ValueError(
                f"kv_compression_window must be in [1, 4096], got {self.kv_compression_window}"
            )
        check_kv_budget(
            self.kv_compression_budget, self.kv_compression_window, "kv_compression_budget"
        )
        if self.kv_compression_min_prompt_len < 0:
            raise ValueError(
                "kv_compression_min_prompt_len must be >= 0, got "
                f"{self.kv_compression_min_prompt_len}"
            )

    def replace(self, **changes: object) -> EngineConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SchedulerConfig:
    """The numbers the scheduler needs, resolved from EngineConfig and the model."""

    max_num_seqs: int  # requests in one step at most
    max_num_batched_tokens: int  # tokens computed in one step at most
    max_model_len: int  # a request's prompt plus output at most
    enable_chunked_prefill: bool = True  # False: a prompt is prefilled in one step or waits
    num_lookahead_tokens: int = 0  # KV slots reserved per step for speculative tokens

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}) when chunked prefill is off"
            )
