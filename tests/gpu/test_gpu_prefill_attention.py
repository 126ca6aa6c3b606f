"""The prefill path as the engine enters it (cuda/prefill_attention.attention_cuda, which
worker/cuda_attention.py calls) against the torch reference, and the helpers of the prefill
kernel's GPU tests (tests/gpu/test_gpu_prefill_v2.py: round 2, the prefill kernel, directly).

Every case draws fresh random shapes and inputs: whole prompts and chunked-prefill chunks
(queries at an offset into the sequence) of lengths that are not multiples of the tiles or
pages, zero-length padding entries, in one mixed batch; physical pages shuffled; free pages
and unused page tails NaN; outputs poisoned with NaN. Accuracy bar (FlashAttention's):
error against an fp32 reference at most twice a plain low-precision torch computation's.
FP8 caches (float8_e4m3fn, K / k_scale and V / v_scale) are checked against
paged_attention_ref run on the CPU over the same FP8 bytes, the bar taken on the dequantized
cache. The routing tests also record which kernel ran: round 2 or the older one.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from cuda import paged_attention_kernels as pak
from cuda import prefill_attention as pa
from cuda import prefill_v2 as v2
from cuda.kv_write import quantize_kv
from cuda.paged_attention import AttentionMetadata, AttentionParams, paged_attention_ref
from tests.gpu.test_gpu_kernels import CONTEXTS, Batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def mixed_reqs(rnd: random.Random) -> list[tuple[int, int]]:
    """(q_len, seq_len) pairs: whole prompts, chunks after cached tokens, padding."""
    reqs: list[tuple[int, int]] = [(0, 0)]
    for s in CONTEXTS:
        if s <= 700:
            reqs.append((s, s))
        reqs.append((min(s, rnd.choice([2, 7, 64, 129, 300, rnd.randint(1, 200)])), s))
    for _ in range(3):
        s = rnd.randint(2, 1500)
        reqs.append((rnd.randint(1, s), s))
    reqs.append((0, 0))
    rnd.shuffle(reqs)
    return reqs


def new_batch(
    rnd: random.Random, group: int, head_dim: int, block_size: int, dtype: torch.dtype, **kw
) -> Batch:
    reqs = kw.pop("reqs", None) or mixed_reqs(rnd)
    return Batch(
        reqs,
        num_kv_heads=kw.pop("num_kv_heads", 2),
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )


def check(batch: Batch, out: torch.Tensor, window: int | None = None) -> None:
    assert torch.isfinite(out).all(), f"unwritten or NaN output elements; reqs {batch.reqs}"
    ref = batch.reference(sliding_window=window)
    err = (out.float() - ref).abs().max().item()
    base = (batch.lowp(window).float() - ref).abs().max().item()
    assert err <= 2 * base + 2e-3, f"error {err:.3g} vs low-precision {base:.3g}; {batch.reqs}"


def quantize(batch: Batch, k_scale: float, v_scale: float) -> torch.Tensor:
    """The batch's cache as FP8 (NaN poison kept); returns the 16-bit original."""
    cache16 = batch.kv_cache
    batch.kv_cache = torch.stack(
        [quantize_kv(cache16[0], k_scale), quantize_kv(cache16[1], v_scale)]
    )
    return cache16


def check_fp8(batch: Batch, out: torch.Tensor, params: AttentionParams) -> float:
    """out against paged_attention_ref on the CPU over the same FP8 cache; returns the error."""
    assert torch.isfinite(out).all(), f"unwritten or NaN output elements; reqs {batch.reqs}"
    md = batch.metadata()
    md_cpu = AttentionMetadata(
        md.query_start_loc.cpu(),
        md.seq_lens.cpu(),
        md.block_tables.cpu(),
        md.slot_mapping.cpu(),
        md.max_query_len,
        md.max_seq_len,
    )
    ref = paged_attention_ref(batch.q.cpu().float(), batch.kv_cache.cpu(), md_cpu, params)
    err = (out.cpu().float() - ref).abs().max().item()
    fp8_cache = batch.kv_cache
    k = fp8_cache[0].float() * params.k_scale
    v = fp8_cache[1].float() * params.v_scale
    batch.kv_cache = torch.stack([k, v]).to(batch.q.dtype)  # lowp's dequantized cache
    try:
        base = (batch.lowp(params.sliding_window).float().cpu() - ref).abs().max().item()
    finally:
        batch.kv_cache = fp8_cache
    assert err <= 2 * base + 2e-3, f"error {err:.3g} vs low-precision {base:.3g}; {batch.reqs}"
    return err


def fp8_params(rnd: random.Random, batch: Batch, window: int | None = None) -> AttentionParams:
    k_scale, v_scale = rnd.choice([(0.5, 0.25), (0.037, 0.021), (1.0, 1.0)])
    quantize(batch, k_scale, v_scale)
    return AttentionParams(batch.scale, window, k_scale=k_scale, v_scale=v_scale)


def run_entry(
    monkeypatch: pytest.MonkeyPatch,
    batch: Batch,
    params: AttentionParams,
    env: dict[str, str],
) -> tuple[torch.Tensor, list[str]]:
    """attention_cuda with the choices worker/cuda_attention.py reads from `env`; returns the
    output and the kernels that ran ('v2:<config>' or 'old')."""
    ran: list[str] = []
    real_v2, real_old = v2.prefill_v2_cuda, pak.paged_attention_cuda

    def spy_v2(*a: Any, **k: Any) -> torch.Tensor:
        ran.append(f"v2:{a[5].name}")
        return real_v2(*a, **k)

    def spy_old(*a: Any, **k: Any) -> torch.Tensor:
        ran.append("old")
        return real_old(*a, **k)

    monkeypatch.setattr(v2, "prefill_v2_cuda", spy_v2)
    monkeypatch.setattr(pak, "paged_attention_cuda", spy_old)
    choices = (pa.choice_from_env(env), pa.fp8_choice_from_env(env))
    out = torch.full_like(batch.q, float("nan"))
    pa.attention_cuda(batch.q, batch.kv_cache, batch.metadata(), params, out, None, *choices)
    torch.cuda.synchronize()
    return out, ran


DEFAULT = f"v2:{v2.DEFAULT_CONFIG.name}"
OTHER = v2.CONFIGS[-1].name


@pytest.mark.parametrize(
    ("kv", "env", "want"),
    [
        ("kv16", {}, DEFAULT),
        ("kv16", {pa.ENV: "new"}, DEFAULT),
        ("kv16", {pa.ENV: OTHER}, f"v2:{OTHER}"),
        ("kv16", {pa.ENV: "old"}, "old"),
        ("kv16", {pa.FP8_ENV: "old"}, DEFAULT),  # FP8's switch leaves 16-bit caches alone
        ("fp8", {}, DEFAULT),
        ("fp8", {pa.ENV: OTHER}, f"v2:{OTHER}"),
        ("fp8", {pa.FP8_ENV: "old"}, "old"),
        ("fp8", {pa.ENV: "old"}, "old"),
    ],
    ids=lambda v: (
        (",".join(f"{k}={x}" for k, x in v.items()) or "defaults")
        if isinstance(v, dict)
        else str(v)
    ),
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_entry_routes_and_matches_the_reference(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, kv: str, env: dict[str, str], want: str
) -> None:
    rnd = random.Random()
    batch = new_batch(
        rnd, rnd.choice([3, 4, 7]), rnd.choice([64, 128]), rnd.choice([16, 32]), dtype
    )
    window = rnd.choice([None, 100])
    if kv == "fp8":
        params = fp8_params(rnd, batch, window)
        out, ran = run_entry(monkeypatch, batch, params, env)
        check_fp8(batch, out, params)
    else:
        out, ran = run_entry(monkeypatch, batch, AttentionParams(batch.scale, window), env)
        check(batch, out, window)
    assert ran == [want]


@pytest.mark.parametrize("kv", ["kv16", "fp8"])
def test_long_prompts_llama3_heads(monkeypatch: pytest.MonkeyPatch, kv: str) -> None:
    # Llama-3-8B heads (32 q, 8 KV, head_dim 128) on the default route: a whole 2k-ish
    # prompt and a long chunk after a cached prefix.
    rnd = random.Random()
    reqs = [(rnd.randint(1900, 2100), 0), (rnd.randint(300, 700), rnd.randint(3000, 4000))]
    reqs = [(q, max(q, s)) for q, s in reqs]
    batch = new_batch(rnd, 4, 128, 16, torch.bfloat16, reqs=reqs, num_kv_heads=8)
    if kv == "fp8":
        params = fp8_params(rnd, batch)
        out, ran = run_entry(monkeypatch, batch, params, {})
        check_fp8(batch, out, params)
    else:
        out, ran = run_entry(monkeypatch, batch, AttentionParams(batch.scale), {})
        check(batch, out)
    assert ran == [DEFAULT]


def test_decode_steps_stay_on_the_older_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # q_len 1 everywhere: the decode path, whatever HEADRACE_PREFILL_KERNEL says.
    rnd = random.Random()
    reqs = [(1, rnd.randint(1, 2000)) for _ in range(5)]
    batch = new_batch(rnd, 4, 128, 16, torch.bfloat16, reqs=reqs)
    out, ran = run_entry(monkeypatch, batch, AttentionParams(batch.scale), {})
    check(batch, out)
    assert ran == ["old"]
