"""The CUDA paged attention and KV-write wrappers' launches, checked on CPU against the
kernels' own parameter lists: every argument in the order, type and meaning the source
declares.

No GPU: the kernels are never loaded; `compiler.launch` records what it is given, and the
CPU tensors' data pointers stand for device pointers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from cuda import compiler, decode_attention, kv_write_kernel
from cuda import paged_attention_kernels as pak
from cuda.paged_attention import AttentionMetadata, AttentionParams
from tests.kernel_signatures import kernel_parameters


def _launches(monkeypatch: pytest.MonkeyPatch, **case: Any) -> tuple[list[Any], dict[str, Any]]:
    calls: list[Any] = []
    monkeypatch.setattr(pak, "unsupported_reason", lambda q, kv: None)
    monkeypatch.setattr(pak, "_kernel", lambda dtype, head_dim, name, kv_dtype=None: name)
    monkeypatch.setattr(pak, "decode_slots", lambda kernel, device: 264)
    monkeypatch.setattr(decode_attention, "_kernel", lambda dtype, head_dim, name, cfg: name)
    monkeypatch.setattr(decode_attention, "_slots_per_sm", lambda kernel, device, key: 2)
    monkeypatch.setattr(pak, "num_sms", lambda device: 132)
    kernel = case.get("decode_kernel", "new")
    monkeypatch.setenv(decode_attention.ENV, "new" if kernel == "unfused" else kernel)
    monkeypatch.setenv(decode_attention.FUSED_MERGE_ENV, "0" if kernel == "unfused" else "1")
    # The fixed variants' geometry below (plan v3's picks: tests/test_decode_plan3.py).
    monkeypatch.setenv(decode_attention.PLAN_ENV, "v2")
    monkeypatch.setenv(decode_attention.FP8_MATH_ENV, "auto")
    monkeypatch.setattr(compiler, "launch", lambda *call, shmem=0: calls.append((*call, shmem)))
    q_lens, seq_lens = case["q_lens"], case["seq_lens"]
    kv_dtype = torch.float8_e4m3fn if case.get("fp8") else torch.bfloat16
    t = {
        "q": torch.randn(sum(q_lens), 8, 64, dtype=torch.bfloat16),
        "kc": torch.zeros(2, 700, 32, 2, 64, dtype=kv_dtype),
        "query_start_loc": torch.tensor([0, *np.cumsum(q_lens)], dtype=torch.int32),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "block_tables": torch.zeros(len(q_lens), 600, dtype=torch.int32),
        "part_o": torch.empty(10**6, dtype=torch.float32),  # the workspace
    }
    t["out"] = torch.empty_like(t["q"])
    md = AttentionMetadata(
        t["query_start_loc"],
        t["seq_lens"],
        t["block_tables"],
        torch.empty(0, dtype=torch.int64),
        max(q_lens),
        max(seq_lens),
    )
    params = AttentionParams(0.125, case.get("window"), 0.5, 0.25)
    pak.paged_attention_cuda(t["q"], t["kc"], md, params, t["out"], t["part_o"])
    return calls, t


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize(
    ("q_lens", "seq_lens", "kernels", "decode_kernel"),
    [
        ([1, 1, 1], [5, 300, 9000], ["decode_g4", "merge_splits"], "old"),
        ([1, 1, 1], [5, 300, 9000], ["decode_tc"], "new"),  # its last split merges
        ([1, 1, 1], [5, 300, 9000], ["decode_tc"], "auto"),
        ([1, 1, 1], [5, 300, 9000], ["decode_tc", "decode_tc_merge"], "unfused"),
        ([7, 1, 0], [7, 40, 3], ["prefill"], "new"),
    ],
)
def test_launch_arguments_follow_the_kernel_signatures(
    monkeypatch: pytest.MonkeyPatch,
    fp8: bool,
    window: int | None,
    q_lens,
    seq_lens,
    kernels,
    decode_kernel: str,
) -> None:
    case = {"q_lens": q_lens, "seq_lens": seq_lens, "fp8": fp8, "window": window}
    calls, t = _launches(monkeypatch, decode_kernel=decode_kernel, **case)
    signatures = kernel_parameters(pak.source()) | kernel_parameters(decode_attention.source())
    if fp8 and kernels[0] == "decode_tc":
        kernels = ["decode_tc_fp8", *kernels[1:]]
    assert [c[0] for c in calls] == kernels
    for kernel, grid, block, *args, shmem in calls:
        names = [n for n, _ in signatures[kernel]]
        assert [type(a) for a in args] == [k for _, k in signatures[kernel]], kernel
        got = dict(zip(names, args, strict=True))
        # Grids: decode (splits, Hkv x query-head chunks, B), merge (Hq, B), prefill
        # (ceil(q_len x group / 64), Hkv, B); merge runs one thread per head-dim element.
        # The new decode kernel: (splits, Hkv x chunks of 8 query heads, B), its default
        # variant's warps, and its stages in dynamic shared memory: 16-bit KV 2 warps x 3
        # stages x 16 tokens x K + V x 64 dims x 2 bytes = 24 KB; FP8 4 x 4 x 16 x 2 x 64 x 1
        # = 32 KB.
        expect = {"decode_g4": (grid[0], 2, 3), "merge_splits": (8, 3), "prefill": (1, 2, 3)}
        expect |= {"decode_tc": (grid[0], 2, 3), "decode_tc_fp8": (grid[0], 2, 3)}
        expect["decode_tc_merge"] = (8, 3)
        threads = {"merge_splits": 64, "decode_tc_merge": 64, "decode_tc": 64, "decode_tc_fp8": 128}
        smem = {"decode_tc": 24576, "decode_tc_fp8": 32768}
        assert tuple(grid) == expect[kernel] and block == threads.get(kernel, 128)
        assert shmem == smem.get(kernel, 0)
        for name, tensor in t.items():
            if name in got:
                assert got[name] == tensor.data_ptr(), (kernel, name)
        if "part_lse" in got:  # after the partial outputs: fp32 [splits, B, Hq, D]
            splits = calls[0][1][0]  # the decode grid's width
            assert got["part_lse"] - got["part_o"] == splits * 3 * 8 * 64 * 4
            assert got.get("max_splits", splits) == splits
        assert got["window"] == (window or 0)
        if decode_kernel != "old" and kernel != "prefill":
            # 2 KV heads x 3 requests = 6 blocks a split on 132 x 2 slots: 40 splits are
            # the fewest that fill 90% of the wave (9000 tokens allow 64 of 128).
            assert got["min_chunk"] == decode_attention.MIN_CHUNK == 128
            assert calls[0][1][0] == 40
        if kernel.startswith("decode_tc") and "merge" not in kernel:
            # 40 splits: the fused merge's counters, one per (request, KV head x chunk),
            # unless HEADRACE_DECODE_FUSED_MERGE=0 (null: the merge kernel runs).
            fused = decode_kernel != "unfused"
            assert (got["counters"] != 0) == fused
            if fused:
                counters = decode_attention._counters["cpu"]
                assert got["counters"] == counters.data_ptr() and counters.numel() >= 2 * 3
                assert not counters.any()
        if "scale_log2" in got:
            scale = 0.125 * (0.5 if fp8 else 1.0) * pak.LOG2E
            assert got["scale_log2"] == np.float32(scale)
            assert got["v_scale"] == np.float32(0.25 if fp8 else 1.0)
            assert (got["num_kv_heads"], got["group"], got["block_shift"]) == (2, 4, 5)
            assert got["bt_stride"] == 600 and got["v_off"] == 700 * 32 * 2 * 64


@pytest.mark.parametrize(
    ("config", "threads", "shmem"), [("w2s3", 64, 24576), ("W8S2", 256, 65536)]
)
def test_decode_config_env_sets_threads_and_shared_memory(
    monkeypatch: pytest.MonkeyPatch, config: str, threads: int, shmem: int
) -> None:
    monkeypatch.setenv(decode_attention.CONFIG_ENV, config)
    calls, _ = _launches(monkeypatch, q_lens=[1, 1], seq_lens=[50, 70], fp8=False)
    assert [c[0] for c in calls] == ["decode_tc"]  # 1 split: the merge is skipped
    assert calls[0][2] == threads and calls[0][-1] == shmem


@pytest.mark.parametrize("bad", ["w4", "x4s2", "w0s2", "w4s1", "w17s2"])
def test_decode_config_env_is_validated(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(decode_attention.CONFIG_ENV, bad)
    with pytest.raises(ValueError, match=decode_attention.CONFIG_ENV):
        _launches(monkeypatch, q_lens=[1], seq_lens=[50], fp8=False)


class _OnDevice(torch.Tensor):
    """A CPU tensor the wrappers take for a CUDA one (is_cuda is all they ask)."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kv_write_arguments_follow_the_kernel_signatures(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, fp8: bool
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(compiler, "load_module", lambda source, name: _Names())
    monkeypatch.setattr(compiler, "launch", lambda *call, shmem=0: calls.append(call))
    k, v = torch.randn(5, 2, 64, dtype=dtype), torch.randn(5, 2, 64, dtype=dtype)
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    cache = torch.zeros(2, 10, 16, 2, 64, dtype=cache_dtype).as_subclass(_OnDevice)
    slots = torch.arange(5, dtype=torch.int64)
    kv_write_kernel.write_kv_cuda(k, v, cache, slots, 0.5, 0.25)
    ((kernel, grid, block, *args),) = calls
    assert kernel == (kv_write_kernel.FP8_KERNELS[dtype] if fp8 else "write_kv")
    signature = kernel_parameters(kv_write_kernel.SOURCE)[kernel]
    assert [type(a) for a in args] == [t for _, t in signature]
    got = dict(zip([n for n, _ in signature], args, strict=True))
    pointers = {"k": k, "v": v, "cache": cache, "slot_mapping": slots}
    assert all(got[n] == t.data_ptr() for n, t in pointers.items())
    row_vecs = 2 * 64 * 2 // 16  # 16-byte source vectors per token
    assert (got["k_stride"], got["v_stride"], got["row_vecs"]) == (row_vecs, row_vecs, row_vecs)
    assert got["v_off"] == 10 * 16 * row_vecs and grid == (5,) and block == 32
    if fp8:
        assert (got["k_inv"], got["v_inv"]) == (2.0, 4.0)


class _Names:
    def kernel(self, name: str) -> str:
        return name


def _int4_weight(n: int, k: int, group_size: int) -> Any:
    from cuda import int4_gemm as ig

    g = torch.Generator().manual_seed(n + k)
    return ig.Int4Weight(
        qw=ig.pack_rows(torch.randint(0, 16, (n, k), generator=g)),
        scales=torch.rand(n, k // group_size, generator=g).half(),
        zeros=torch.randint(0, 16, (n, k // group_size), generator=g).to(torch.uint8),
        group_size=group_size,
    )


@pytest.mark.parametrize(
    ("m", "n", "k", "group_size"),
    [(1, 4096, 4096, 128), (3, 100, 576, 64), (8, 4096, 14336, 32), (11, 40, 8192, 8192)],
)
def test_int4_split_gemv_arguments_follow_the_kernel_signature(
    monkeypatch: pytest.MonkeyPatch, m: int, n: int, k: int, group_size: int
) -> None:
    from cuda import int4_gemm as ig
    from cuda import int4_gemv as sk

    calls: list[Any] = []
    monkeypatch.setattr(sk, "_kernel", lambda dtype, plan: plan.name)
    monkeypatch.setattr(sk, "_sms", lambda device: 132)
    monkeypatch.setattr(ig, "GEMV_MAX_ROWS", 16)
    monkeypatch.setattr(ig, "GEMV_IMPL", "split")
    monkeypatch.setattr(compiler, "launch", lambda *c, shmem=0: calls.append((*c, shmem)))
    w = _int4_weight(n, k, group_size)
    x = torch.randn(m, k + 8, dtype=torch.bfloat16)[:, :k].as_subclass(_OnDevice)  # strided
    y = torch.empty(m, n, dtype=torch.bfloat16)
    assert ig.int4_linear(x, w, out=y) is y
    text = sk.source()
    args_macro = text[text.index("#define HR_SK_ARGS") : text.index("#define HR_SK_PASS")]
    source = args_macro + '\nextern "C" __global__ void signature(HR_SK_ARGS) {}\n'
    signature = kernel_parameters(source)["signature"]
    part, counters = sk.workspace(x.device)
    assert len(calls) == -(-m // 8)  # 8 rows of x a launch
    for i, (kernel, grid, block, *args, shmem) in enumerate(calls):
        rows = min(8, m - 8 * i)
        plan = sk.choose(n, k, rows, 132)
        assert (kernel, tuple(grid), block, shmem) == (
            plan.name,
            plan.grid(n),
            256,
            rows * plan.chunks_per_split * 136,
        )
        assert shmem + 1024 <= 48 * 1024 and plan.grid(n)[0] <= sk.COUNTERS
        assert [type(a) for a in args] == [t for _, t in signature]
        got = dict(zip([name for name, _ in signature], args, strict=True))
        assert got["x"] == x.data_ptr() + 8 * i * (k + 8) * 2 and got["x_stride"] == k + 8
        assert got["y"] == y.data_ptr() + 8 * i * n * 2 and got["y_stride"] == n
        assert (got["qw"], got["scales"], got["zeros"]) == tuple(
            t.data_ptr() for t in (w.qw, w.scales, w.zeros)
        )
        assert (got["N"], got["K"], got["group_size"], got["Mr"]) == (n, k, group_size, rows)
        assert got["chunks_per_split"] == plan.chunks_per_split
        assert (got["part"], got["counters"]) == (part.data_ptr(), counters.data_ptr())
        assert plan.splits * rows * n <= part.numel()


def test_int4_old_gemv_is_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    from cuda import int4_gemm as ig

    calls: list[Any] = []
    monkeypatch.setattr(ig, "_kernel", lambda dtype, name: name)
    monkeypatch.setattr(ig, "GEMV_IMPL", "old")
    monkeypatch.setattr(compiler, "launch", lambda *c, shmem=0: calls.append(c))
    w = _int4_weight(100, 256, 128)
    x = torch.randn(6, 256, dtype=torch.bfloat16).as_subclass(_OnDevice)
    ig.int4_linear(x, w, out=torch.empty(6, 100, dtype=torch.bfloat16))
    assert [(c[0], c[1], c[2]) for c in calls] == [("gemv_m4", (13,), 128), ("gemv_m2", (7,), 128)]
