"""The CUDA attention backend: our NVRTC kernels for the KV write and paged attention.

Launches go on torch's current stream with no host sync, so a decode step can be captured
in a CUDA graph. Steps with q_len > 1 run the prefill kernel, round 2 (cuda/prefill_v2.py,
routed by cuda/prefill_attention.py), FP8 caches too (HEADRACE_PREFILL_KERNEL=old, or
HEADRACE_PREFILL_FP8=old for FP8 caches: the older one in cuda/paged_attention_kernels.py,
which also takes what round 2 does not cover). Sliding windows run in the
kernels; shapes they do not cover (head dims other than 64 and 128) fall back to the torch
reference inside the kernel wrappers.
"""

from __future__ import annotations

import logging
import os

import torch

from cuda.kv_write_kernel import write_kv_cuda
from cuda.prefill_attention import attention_cuda, choice_from_env, fp8_choice_from_env
from worker.attention import AttentionMetadata, AttentionParams, PagedBackend
from worker.decode_workspace import MAX_SPLITS, workspace_numel

log = logging.getLogger(__name__)


class CudaAttention(PagedBackend):
    name = "cuda"

    def __init__(self) -> None:
        # fp32 scratch for flash-decoding partials, grown on demand outside graph capture
        # (capture sizes it for the largest bucket first, so replays never grow it).
        self.workspace: torch.Tensor | None = None
        # Steps with q_len > 1: prefill round 2 unless HEADRACE_PREFILL_KERNEL=old (or one
        # of round 2's configuration names: see cuda/prefill_attention.py); FP8 caches on
        # round 2 too unless HEADRACE_PREFILL_FP8=old.
        self.prefill_kernel = choice_from_env()
        self.prefill_fp8 = fp8_choice_from_env()

    write_kv = staticmethod(write_kv_cuda)
    splits_decodes = True  # worker/decode_split.py

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
        params: AttentionParams,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out is None:
            out = torch.empty_like(q)
        workspace = self._workspace(q, md, kv_cache.shape[3])
        return attention_cuda(
            q, kv_cache, md, params, out, workspace, self.prefill_kernel, self.prefill_fp8
        )

    @staticmethod
    def graph_blocker(head_dim: int, dtype: torch.dtype, sliding_window: int | None) -> str | None:
        """Why decode steps of this model cannot be captured in a CUDA graph, if they can't.

        The torch fallback reads lengths on the host, which graph capture forbids.
        """
        from cuda.paged_attention_kernels import DTYPES, HEAD_DIMS

        if head_dim not in HEAD_DIMS:
            return f"head_dim {head_dim} has no CUDA kernel (kernels take {HEAD_DIMS})"
        if dtype not in DTYPES:
            return f"dtype {dtype} has no CUDA kernel (kernels take bf16/fp16)"
        return None

    def _workspace(
        self, q: torch.Tensor, md: AttentionMetadata, kv_heads: int
    ) -> torch.Tensor | None:
        if md.max_query_len != 1:
            return None
        from cuda.paged_attention_kernels import num_sms

        # Large batches take few splits: sized by worker/decode_workspace.py's bound
        # (HEADRACE_DECODE_WORKSPACE=max: 64 splits per row, as before).
        batch = md.seq_lens.shape[0]
        if os.environ.get("HEADRACE_DECODE_WORKSPACE") == "max":
            need = batch * q.shape[1] * MAX_SPLITS * (q.shape[2] + 1)
        else:
            need = workspace_numel(batch, q.shape[1], kv_heads, q.shape[2], num_sms(q.device))
        if self.workspace is None or self.workspace.numel() < need:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("decode workspace must be sized before graph capture")
            self.workspace = torch.empty(need, dtype=torch.float32, device=q.device)
        return self.workspace
