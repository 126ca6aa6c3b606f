"""Step inputs on the device (HEADRACE_STEP_INPUTS=numba, worker/device_inputs.py), on CPU.

The engine's kernels run through Numba's CUDA simulator on numpy views of the CPU tensors;
the persistent device state, its diffs, gathers and the kernels' advance of num_computed
are the real code. What only a GPU covers (tests/gpu/test_gpu_device_inputs.py): the
kernels compiled by Numba for the card and launched on torch's stream, the decode CUDA
graphs that contain them, and pinned copies ordered with the compute stream.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba.cuda is first imported

from cuda.step_inputs import RowState, StepInputArrays, launch_row_step_inputs, row_step_inputs_ref
from ipc.messages import EngineRequest, SamplingParams
from tests.test_persistent_batch import _compact_one, _new_request, _tokens
from worker.config import EngineConfig, SchedulerConfig
from worker.device_inputs import DeviceInputBatch, DeviceStepState, step_inputs_mode
from worker.engine import EngineCore
from worker.input_batch import build_host_inputs
from worker.kv_cache import KVCacheManager
from worker.scheduler import Scheduler


def _state(b: int, rows: int, width: int, computed, num_new, kv_offset=None, seed: int = 0):
    rng = np.random.default_rng(seed)
    tables = rng.permutation(rows * width + 7)[: rows * width].reshape(rows, width)
    pad = np.zeros(rows - len(computed), dtype=np.int32)
    return RowState(
        np.array([b], dtype=np.int32),
        np.concatenate([np.asarray(computed, dtype=np.int32), pad + 5]),  # stale padding rows
        np.concatenate([np.asarray(num_new, dtype=np.int32), pad + 3]),
        np.concatenate([np.asarray(kv_offset or [0] * len(computed), dtype=np.int32), pad]),
        tables.astype(np.int32),
    )


def _poisoned(max_reqs: int, max_tokens: int) -> StepInputArrays:
    return StepInputArrays(
        np.full(max_reqs + 1, -7, dtype=np.int32),
        np.full(max_reqs, -7, dtype=np.int32),
        np.full(max_tokens, -7, dtype=np.int64),
        np.full(max_tokens, -7, dtype=np.int64),
        np.full(max_tokens, -7, dtype=np.int64),
    )


CASES = {
    # name: (block size, num_computed, num_new, kv_offset, graph rows, token rows)
    "no rows": (16, [], [], None, 4, 4),
    "one decode": (16, [0], [1], None, 1, 1),
    "at a block's last slot": (16, [15, 31, 47], [1, 1, 1], None, 3, 3),
    "at a block's first slot": (32, [32, 64, 0], [1, 1, 1], None, 3, 3),
    "crossing a boundary": (16, [14, 30], [5, 3], None, 2, 8),
    "graph padding": (32, [31, 7, 100], [1, 1, 1], None, 8, 8),
    "compressed rows": (16, [20, 3], [1, 1], [37, 0], 4, 4),
    "more rows than a scan chunk": (16, list(range(0, 200, 5)), [1] * 40, None, 45, 48),
}


@pytest.mark.parametrize("name", CASES)
def test_row_kernels_match_the_reference(name: str) -> None:
    bs, computed, num_new, offsets, max_reqs, max_tokens = CASES[name]
    b = len(computed)
    width = (max(computed, default=0) + 40) // bs + 1
    state = _state(b, max(max_reqs, b) + 2, width, computed, num_new, offsets)
    ref, after = row_step_inputs_ref(state, bs, max_reqs, max_tokens)
    out = _poisoned(max_reqs, max_tokens)
    launch_row_step_inputs(state, bs, out, max_reqs)
    total = int(ref.query_start_loc[b])
    np.testing.assert_array_equal(out.query_start_loc, ref.query_start_loc)
    np.testing.assert_array_equal(out.seq_lens, ref.seq_lens)
    np.testing.assert_array_equal(out.positions[:total], ref.positions[:total])
    np.testing.assert_array_equal(out.slot_mapping, ref.slot_mapping)
    assert (out.input_ids == -7).all()  # ids come from elsewhere: never written
    np.testing.assert_array_equal(state.num_computed, after)  # advanced; padding rows kept


def test_reference_by_hand() -> None:
    # block 4: row 0 at cache index 3 (last slot of its block 9), row 1 at 4 (offset 10).
    state = RowState(
        np.array([2], dtype=np.int32),
        np.array([3, 4, 0], dtype=np.int32),
        np.array([2, 1, 9], dtype=np.int32),
        np.array([0, 10, 0], dtype=np.int32),
        np.array([[9, 5], [1, 2], [7, 7]], dtype=np.int32),
    )
    ref, after = row_step_inputs_ref(state, 4, 3, 5)
    assert ref.query_start_loc.tolist() == [0, 2, 3, 3]
    assert ref.seq_lens.tolist() == [5, 5, 0]
    assert ref.positions[:3].tolist() == [3, 4, 14]
    assert ref.slot_mapping.tolist() == [39, 20, 8, -1, -1]
    assert after.tolist() == [5, 5, 0]


def test_kernels_compile_for_sm90() -> None:
    # The simulator does not type the kernels; Numba's compiler does (no GPU needed).
    code = (
        "import numpy as np\n"
        "np.row_stack = getattr(np, 'row_stack', np.vstack)\n"
        "from numba import cuda, types\n"
        "import cuda.step_inputs as si\n"
        "a32, a64 = types.int32[:], types.int64[:]\n"
        "t2 = types.Array(types.int32, 2, 'A')\n"
        "i = types.int64\n"
        "cuda.compile_ptx(si._row_scan_kernel.py_func, (a32, a32, a32, i, a32, a32), cc=(9, 0))\n"
        "cuda.compile_ptx(si._row_token_kernel.py_func,"
        " (a32, a32, a32, t2, i, a32, i, a64, a64), cc=(9, 0))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_mode_names_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADRACE_STEP_INPUTS", "gpu")
    with pytest.raises(ValueError, match="HEADRACE_STEP_INPUTS"):
        step_inputs_mode()


def _counting(fn, calls: list):
    def wrapped(idx, val):  # records the scatters that send something
        if sum(len(i) for i in idx):
            calls.append((idx, val))
        return fn(idx, val)

    return wrapped


@pytest.mark.parametrize("seed", range(4))
def test_device_state_equals_the_host_builder(seed: int) -> None:
    check_device_state(seed, torch.device("cpu"))


def check_device_state(seed: int, device: torch.device) -> None:
    """Randomized schedules from the real scheduler (arrivals, aborts, preemption in a small
    cache, chunked prefill, prefix hits, KV compaction's offsets): every device-built step's
    inputs equal build_host_inputs', and steady decode steps send nothing to the device
    (tests/gpu/test_gpu_device_inputs.py runs it on the GPU)."""
    rng = random.Random(seed)
    bs = rng.choice([4, 16, 32])
    kv = KVCacheManager(rng.randint(12, 40), bs, rng.random() < 0.5)
    config = SchedulerConfig(
        max_num_seqs=rng.randint(2, 7),
        max_num_batched_tokens=rng.randint(16, 64),
        max_model_len=128,
    )
    s = Scheduler(config, kv)
    rows = config.max_num_seqs
    state = DeviceStepState(rows, -(-128 // bs), bs, device)
    batch = DeviceInputBatch(state, build_host_inputs, lambda: True)
    sent: list = []
    state._scatter = _counting(state._scatter, sent)  # type: ignore[method-assign]
    n_req = steps = steady = 0
    while steps < 120:
        if n_req < 30 and rng.random() < 0.3:
            s.add_request(_new_request(rng, n_req, kv.num_blocks * kv.block_size))
            n_req += 1
        if s.running and rng.random() < 0.03:
            s.abort_requests([rng.choice(s.running).request_id])
        if rng.random() < 0.05:
            _compact_one(rng, s, kv)
        out = s.schedule()
        if out.empty:
            if not s.has_unfinished_requests() and n_req >= 30:
                break
            continue
        steps += 1
        host = batch.build(out)
        ref = build_host_inputs(out)
        if host.device is not None:
            order, b = list(state.order), len(out.scheduled)
            before = len(sent)
            inputs = state.eager_inputs(host)
            md = inputs.md
            assert md.query_start_loc.tolist() == ref.query_start_loc.tolist()
            assert md.seq_lens.tolist() == ref.seq_lens.tolist() == host.seq_lens.tolist()
            assert inputs.positions.tolist() == ref.positions.tolist()
            assert md.slot_mapping.tolist() == ref.slot_mapping.tolist()
            assert inputs.input_ids.tolist() == ref.input_ids.tolist()
            assert md.max_seq_len == ref.max_seq_len
            assert host.sample_rows == ref.sample_rows
            for r in range(b):
                n = -(-int(ref.seq_lens[r]) // bs)
                assert md.block_tables[r, :n].tolist() == ref.block_tables[r, :n].tolist()
            new_block = any((sr.start - sr.kv_offset) % bs == 0 for sr in out.scheduled)
            if order == state.order and not new_block and len(sent) == before:
                steady += 1
        s.update(out, _tokens(rng, out))
    assert batch.device_steps > 10 and steady > 3


def _engine_run(path, prompts, params, abort_at, **args):
    engine = EngineCore(EngineConfig(model=str(path), device="cpu", **args))
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        if i % 2 == 0:  # half arrive at the start, half later
            engine.add_request(EngineRequest(f"r{i}", prompt, p))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    steps = 0
    while engine.has_unfinished_requests() or steps < 2 * len(prompts):
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
        steps += 1
        if steps % 2 == 0 and steps // 2 < len(prompts) and (steps // 2) % 2 == 1:
            i = steps // 2
            engine.add_request(EngineRequest(f"r{i}", prompts[i], params[i]))
        if steps == abort_at:
            engine.abort_requests(["r0"])
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    return tokens, engine


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_greedy_tokens_equal_the_host_path(
    monkeypatch: pytest.MonkeyPatch, stories_path, async_scheduling: bool
) -> None:
    """Arrivals, an abort, preemption (a small cache), chunked prefill (a small budget),
    prefix hits (shared prompt heads): HEADRACE_STEP_INPUTS=numba gives the host path's tokens."""
    rng = random.Random(7)
    head = [1, 403, 407, 261, 378, 290, 300, 311]
    prompts = [
        head[: rng.randint(2, 8)] + [rng.randrange(3, 500) for _ in range(rng.randint(1, 9))]
        for _ in range(6)
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=rng.randint(6, 14), ignore_eos=True)
        for _ in prompts
    ]
    args = dict(
        block_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=12,
        num_gpu_blocks=13,
        async_scheduling=async_scheduling,
        enable_prefix_caching=True,
    )
    monkeypatch.delenv("HEADRACE_STEP_INPUTS", raising=False)
    host, host_engine = _engine_run(stories_path, prompts, params, 9, **args)
    monkeypatch.setenv("HEADRACE_STEP_INPUTS", "numba")
    dev, dev_engine = _engine_run(stories_path, prompts, params, 9, **args)
    assert dev == host and all(dev.values())
    state = dev_engine.runner.device_state
    assert state is not None and state.launches > 10  # decode steps ran on the kernels
    assert host_engine.runner.device_state is None
    assert dev_engine.scheduler.num_preemptions == host_engine.scheduler.num_preemptions > 0
