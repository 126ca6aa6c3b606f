"""Prefill round 2's flat grid on CPU (cuda/prefill_tiles.py, cuda/prefill_v2.py): the tile
map against a brute-force walk of the z grid's blocks through the kernel's own bounds, the
launch (grid and arguments) with and without a map, HEADRACE_PREFILL_GRID, and the map's
trip through the step inputs. The GPU half is tests/gpu/test_gpu_prefill_grid.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch

from cuda import compiler
from cuda import prefill_tiles as pt
from cuda import prefill_v2 as v2
from cuda.paged_attention import AttentionParams
from tests.kernel_signatures import kernel_parameters
from tests.test_prefill_attention import _case


def _random_step(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random q_lens / seq_lens of a mixed step: padding rows (q_len 0, seq_len 0), decode
    rows, whole prompts and chunked prefills (seq_len > q_len), in random order."""
    b = int(rng.integers(1, 40))
    kind = rng.integers(0, 5, size=b)
    q = np.where(kind == 0, 0, np.where(kind == 1, 1, rng.integers(2, 700, size=b)))
    ctx = np.where(kind >= 3, rng.integers(0, 3000, size=b), 0)
    ctx = np.where(kind == 1, rng.integers(0, 3000, size=b), ctx)
    seq = q + ctx
    seq = np.where((kind == 0) & (rng.random(b) < 0.5), 0, seq)  # graph-style padding
    return np.concatenate([[0], np.cumsum(q)]).astype(np.int32), seq.astype(np.int32)


def _brute_force(qsl: np.ndarray, seq: np.ndarray, spec: pt.TileSpec) -> list[tuple[int, int]]:
    """Every z-grid block (r, z) that gets past the kernel's early exit, heaviest first."""
    q_lens = np.diff(qsl)
    z_tiles = math.ceil(int(q_lens.max(initial=0)) * spec.group / spec.block_m)
    found = []
    for r in range(len(seq)):
        for z in range(z_tiles + 1):
            q_len, seq_len = int(q_lens[r]), int(seq[r])
            m_end = q_len * spec.group - z * spec.block_m  # the kernel's end-aligned tile
            if m_end <= 0 or seq_len <= 0:
                continue
            i_hi = (m_end - 1) // spec.group
            kv_hi = min(seq_len, i_hi + seq_len - q_len + 1)
            found.append((-kv_hi, r, z))
    return [(r, z) for _, r, z in sorted(found)]


@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 6, 7, 8])
def test_tile_map_is_the_brute_force_list(group: int, block_m: int) -> None:
    rng = np.random.default_rng(group * 1000 + block_m)
    spec = pt.TileSpec(group, block_m)
    for _ in range(25):
        qsl, seq = _random_step(rng)
        tiles = pt.build_tile_map(qsl, seq, spec)
        assert tiles.dtype == np.int32 and tiles.shape[1:] == (2,) and tiles.flags.c_contiguous
        assert [tuple(t) for t in tiles.tolist()] == _brute_force(qsl, seq, spec)


@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_tiles_write_every_row_once(group: int, block_m: int) -> None:
    """The tiles the map lists cover each request's q_len * group rows exactly once, as
    the z grid's non-empty blocks do: flat and z run the same tiles."""
    rng = np.random.default_rng(group + block_m)
    spec = pt.TileSpec(group, block_m)
    for _ in range(20):
        qsl, seq = _random_step(rng)
        q_lens = np.diff(qsl)
        written = [np.zeros(int(n) * group, dtype=np.int64) for n in q_lens]
        for r, z in pt.build_tile_map(qsl, seq, spec).tolist():
            m_end = int(q_lens[r]) * group - z * block_m
            written[r][max(m_end - block_m, 0) : m_end] += 1
            assert m_end > 0
        for r, rows in enumerate(written):
            assert (rows == (1 if seq[r] > 0 else 0)).all(), r


@pytest.mark.parametrize("window", [1, 7, 64, 500])
def test_sliding_windows_skip_no_listed_tile(window: int) -> None:
    """The kernel's window skip starts at tile n_begin, before n_end: no listed tile is
    empty under a window, so one map serves full and sliding-window layers."""
    rng = np.random.default_rng(window)
    for group, block_m, block_n in ((1, 64, 64), (4, 128, 64), (8, 128, 128), (3, 128, 64)):
        spec = pt.TileSpec(group, block_m)
        for _ in range(10):
            qsl, seq = _random_step(rng)
            q_lens = np.diff(qsl)
            for r, z in pt.build_tile_map(qsl, seq, spec).tolist():
                q_len, seq_len = int(q_lens[r]), int(seq[r])
                ctx = seq_len - q_len
                m_end = q_len * group - z * block_m
                i_lo, i_hi = max(m_end - block_m, 0) // group, (m_end - 1) // group
                kv_hi = min(seq_len, i_hi + ctx + 1)
                n_begin = max(0, i_lo + ctx - window + 1) // block_n
                assert n_begin < -(-kv_hi // block_n)


def test_tile_work_orders_the_w3_step() -> None:
    # 600 decode rows at 200-2000 and 4 chunks of 2048 on 2048-4096 of context: the chunks'
    # end tiles first, decode rows last (longest context first), 600 + 4 x 64 tiles
    rng = np.random.default_rng(3)
    q = np.array([2048] * 4 + [1] * 600)
    ctx = np.concatenate([rng.integers(2048, 4097, 4), rng.integers(200, 2001, 600)])
    qsl = np.concatenate([[0], np.cumsum(q)]).astype(np.int32)
    seq = (q + ctx).astype(np.int32)
    tiles = pt.build_tile_map(qsl, seq, pt.TileSpec(4, 128))
    assert len(tiles) == 4 * 64 + 600
    work = pt.tile_work(np.diff(qsl), seq, tiles.astype(np.int64), pt.TileSpec(4, 128))
    assert (np.diff(work) <= 0).all()
    assert tiles[0].tolist() == [int(np.argmax(seq)), 0]  # the longest chunk's end tile
    # each chunk's tiles end to start; every chunk tile (>= 2048 + 32 keys) before any
    # decode row (<= 2001)
    for r in range(4):
        assert tiles[tiles[:, 0] == r, 1].tolist() == list(range(64))
    assert (tiles[:256, 0] < 4).all() and (tiles[256:, 1] == 0).all()


def test_empty_and_decode_only_steps() -> None:
    spec = pt.TileSpec(4, 128)
    assert pt.build_tile_map(np.array([0]), np.array([], dtype=np.int32), spec).shape == (0, 2)
    tiles = pt.build_tile_map(np.array([0, 0, 0]), np.array([0, 5]), spec)
    assert tiles.shape == (0, 2)
    assert pt.build_tile_map(np.array([0, 1, 2]), np.array([9, 3]), spec).tolist() == [
        [0, 0],
        [1, 0],
    ]


def test_tile_spec_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"TileSpec\.group"):
        pt.TileSpec(0, 128)
    with pytest.raises(ValueError, match=r"TileSpec\.block_m"):
        pt.TileSpec(4, 0)


def test_env() -> None:
    assert pt.grid_from_env({}) == "z" == pt.DEFAULT_GRID
    assert pt.grid_from_env({pt.ENV: "flat"}) == "flat"
    assert pt.grid_from_env({pt.ENV: " z "}) == "z"
    assert pt.grid_from_env({pt.ENV: ""}) == "z"
    with pytest.raises(ValueError, match=r"HEADRACE_PREFILL_GRID=.grid.: expected one of z, flat"):
        pt.grid_from_env({pt.ENV: "grid"})


def test_tile_spec_follows_the_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert v2.tile_spec(32, 8, "v2") == pt.TileSpec(4, v2.DEFAULT_CONFIG.block_m)
    assert v2.tile_spec(28, 4, "v2_m128n128w8s2k64") == pt.TileSpec(7, 128)
    monkeypatch.setenv("HEADRACE_PREFILL_KERNEL", "v2_m128n64w8s2k64")
    assert v2.tile_spec(8, 8) == pt.TileSpec(1, 128)


def _with_map(t: dict[str, Any], spec: pt.TileSpec) -> torch.Tensor:
    tiles = torch.from_numpy(pt.build_tile_map(t["query_start_loc"].numpy(), t["seq_lens"], spec))
    t["md"].prefill_tiles, t["md"].prefill_tile_spec = tiles, spec
    return tiles


def _launch(monkeypatch: pytest.MonkeyPatch, t: dict[str, Any], config: v2.V2Config) -> list[Any]:
    calls: list[Any] = []
    monkeypatch.setattr(v2, "_kernel", lambda dtype, d, fp8, cfg: cfg.kernel_name)
    monkeypatch.setattr(compiler, "launch", lambda *call, shmem=0: calls.append((*call, shmem)))
    params = AttentionParams(0.125, 48)
    v2.prefill_v2_cuda(t["q"], t["kc"], t["md"], params, t["out"], config)
    return calls


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["kv16", "fp8"])
@pytest.mark.parametrize("config", v2.CONFIGS, ids=lambda c: c.name)
def test_flat_launch_follows_the_kernel_signature(
    monkeypatch: pytest.MonkeyPatch, config: v2.V2Config, kv_dtype: torch.dtype
) -> None:
    t = _case([70, 1, 0, 300], [90, 40, 3, 300], kv_dtype)  # group 4 (8 q / 2 kv heads)
    tiles = _with_map(t, pt.TileSpec(4, config.block_m))
    (call,) = _launch(monkeypatch, t, config)
    kernel, grid, block, *args, shmem = call
    assert kernel == config.kernel_name and block == config.threads
    assert shmem == config.smem_bytes(64, kv_dtype == torch.float8_e4m3fn)
    n = math.ceil(70 * 4 / config.block_m) + 1 + math.ceil(300 * 4 / config.block_m)
    assert tuple(grid) == (2, n, 1) and tiles.shape == (n, 2)
    signature = kernel_parameters(v2.source())[kernel]
    assert [type(a) for a in args] == [k for _, k in signature]
    got = dict(zip([name for name, _ in signature], args, strict=True))
    assert got["tile_map"] == tiles.data_ptr() != 0
    for name in ("q", "kc", "query_start_loc", "seq_lens", "block_tables", "out"):
        assert got[name] == t[name].data_ptr(), name


def test_z_launch_passes_a_null_map(monkeypatch: pytest.MonkeyPatch) -> None:
    t = _case([70, 1, 0], [90, 40, 3])
    (call,) = _launch(monkeypatch, t, v2.DEFAULT_CONFIG)
    signature = kernel_parameters(v2.source())[call[0]]
    got = dict(zip([name for name, _ in signature], call[3:-1], strict=True))
    assert tuple(call[1]) == (2, 3, math.ceil(70 * 4 / 128)) and got["tile_map"] == 0


@pytest.mark.parametrize(
    "spec", [pt.TileSpec(2, 128), pt.TileSpec(4, 64)], ids=["other-group", "other-bm"]
)
def test_a_map_cut_for_another_tile_runs_the_z_grid(
    monkeypatch: pytest.MonkeyPatch, spec: pt.TileSpec
) -> None:
    t = _case([70, 1, 0], [90, 40, 3])
    _with_map(t, spec)
    ((_kernel, grid, _block, *args, _shmem),) = _launch(monkeypatch, t, v2.DEFAULT_CONFIG)
    assert tuple(grid) == (2, 3, 3) and args[-1] == 0


def test_a_map_past_grid_y_runs_the_z_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    t = _case([70, 1, 0], [90, 40, 3])
    t["md"].prefill_tiles = torch.zeros(pt.MAX_GRID_Y + 1, 2, dtype=torch.int32)
    t["md"].prefill_tile_spec = pt.TileSpec(4, 128)
    ((_kernel, grid, *_rest),) = _launch(monkeypatch, t, v2.DEFAULT_CONFIG)
    assert tuple(grid) == (2, 3, 3)


def test_an_empty_map_launches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    t = _case([2, 0], [2, 0])
    t["md"].prefill_tiles = torch.zeros(0, 2, dtype=torch.int32)
    t["md"].prefill_tile_spec = pt.TileSpec(4, 128)
    assert _launch(monkeypatch, t, v2.DEFAULT_CONFIG) == []


def test_a_malformed_map_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    t = _case([70, 1], [90, 40])
    t["md"].prefill_tiles = torch.zeros(3, 2, dtype=torch.int64)
    t["md"].prefill_tile_spec = pt.TileSpec(4, 128)
    with pytest.raises(ValueError, match="prefill_tiles must be"):
        _launch(monkeypatch, t, v2.DEFAULT_CONFIG)


def test_the_kernel_reads_its_tile_from_the_map() -> None:
    # The per-tile math after the first lines is shared: only (r, z) differ between grids.
    src = v2.source()
    assert "const int2 *__restrict__ tile_map" in src and "window, tile_map" in src
    assert "int r = blockIdx.y, z = blockIdx.z;" in src
    assert "const int m_end = rows - z * BM;" in src


def test_layers_keep_the_map() -> None:
    t = _case([70, 1], [90, 40])
    tiles = _with_map(t, pt.TileSpec(4, 128))
    md = dataclasses.replace(
        t["md"],
        layer_seq_lens=torch.ones(2, 2, dtype=torch.int32),
        layer_slot_mapping=torch.ones(2, 71),
    )
    layer = md.for_layer(1)
    assert layer.prefill_tiles is tiles and layer.prefill_tile_spec == pt.TileSpec(4, 128)


def _host_step(q_lens: list[int], starts: list[int]) -> Any:
    from worker.input_batch import HostBatch

    batch = HostBatch(16)
    for n, start in zip(q_lens, starts, strict=True):
        batch.add(list(range(n)), start, list(range(1, (start + n) // 16 + 2)))
    return batch.finish()


def test_step_inputs_carry_the_map() -> None:
    from worker.input_batch import to_device

    host = _host_step([300, 1, 1, 40], [0, 90, 7, 500])  # a prompt, 2 decodes, a chunk
    spec = pt.TileSpec(4, 128)
    md = to_device(host, torch.device("cpu"), spec).md
    assert md.prefill_tile_spec == spec and md.prefill_tiles is not None
    want = pt.build_tile_map(host.query_start_loc, host.seq_lens, spec)
    assert (
        md.prefill_tiles.dtype == torch.int32 and md.prefill_tiles.numpy().tolist() == want.tolist()
    )
    assert md.prefill_tiles.tolist()[0] == [3, 0]  # the chunk's 540 keys first
    # no spec (HEADRACE_PREFILL_GRID=z) or a decode step: no map
    assert to_device(host, torch.device("cpu")).md.prefill_tiles is None
    decode = to_device(_host_step([1, 1], [5, 9]), torch.device("cpu"), spec).md
    assert decode.prefill_tiles is None and decode.prefill_tile_spec is None


def test_runner_spec_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.model_runner import prefill_tile_spec

    config = type("C", (), {"num_heads": 24, "num_kv_heads": 8})()
    monkeypatch.delenv(pt.ENV, raising=False)
    assert prefill_tile_spec(config, torch.device("cuda")) is None  # z: the default
    monkeypatch.setenv(pt.ENV, "flat")
    assert prefill_tile_spec(config, torch.device("cuda")) == pt.TileSpec(3, 128)
    assert prefill_tile_spec(config, torch.device("cpu")) is None  # no CUDA kernel runs
    monkeypatch.setenv(pt.ENV, "flat2")
    with pytest.raises(ValueError, match=pt.ENV):
        prefill_tile_spec(config, torch.device("cpu"))


def test_bench_shapes_and_line() -> None:
    from scripts import bench_prefill_grid as bench

    cases = bench.shapes(np.random.default_rng(0))
    assert list(cases) == ["mixed", "1x16k", "4x2k", "mixed_fp8"]
    q, s, fp8 = cases["mixed"]
    assert not fp8 and cases["mixed_fp8"][2] and q.sum() == 600 + 4 * 2048 == 8792
    assert ((q == 1) <= (s >= 200) & (s <= 2000)).all() and ((q > 1) <= (s >= 2048)).all()
    # the W3 step's blocks: 8 KV heads x 604 requests x 64 row tiles, of which 8 x 856 work
    tiles = pt.build_tile_map(np.concatenate([[0], np.cumsum(q)]), s, pt.TileSpec(4, 128))
    assert len(tiles) == 4 * 64 + 600
    row = {
        "shape": "mixed", "kv": "bf16", "rows": 8792, "z_us": 1500.0, "flat_us": 1000.0,
        "z_us_32": 1400.0, "flat_us_32": 1120.0, "blocks": {"z": 309248, "flat": 6848},
        "map_build_us": 120.0, "max_abs_flat_minus_z": 0.0,
    }  # fmt: skip
    line = bench.show(row)
    assert line.startswith("prefillgrid mixed") and "1.50x" in line and "1.25x" in line
    assert "blocks z 309248 flat 6848" in line and "max|flat-z| 0" in line


def test_gpu_bench_step() -> None:
    """gpu_bench.sh's prefillgrid step: the GPU tests and the bench, its timeouts <= 70 s
    (expected about 50 s)."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "scripts" / "gpu_bench.sh").read_text()
    step = re.search(r"\n    prefillgrid\)(.*?);;\n", text, re.S)
    assert step is not None and "# Prefill flat grid" in text
    body = step.group(1)
    assert sum(int(t) for t in re.findall(r"timeout (\d+)", body)) <= 70
    assert "tests/gpu/test_gpu_prefill_grid.py" in body and "bench_prefill_grid.py" in body
    assert "--only prefill_attention_v2" in body
