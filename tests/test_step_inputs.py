"""The Numba step-input kernels against their numpy reference, through Numba's CUDA
simulator on CPU (tests/gpu/test_gpu_step_inputs.py runs the same cases on a GPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before numba.cuda is first imported.
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

from cuda.step_inputs import StepInputArrays, launch_step_inputs, step_inputs_ref


def random_step(seed: int, max_reqs: int, block_size: int) -> dict:
    rng = np.random.default_rng(seed)
    num_rows, max_len = max_reqs + 3, 96
    b = int(rng.integers(1, max_reqs + 1))
    rows = rng.permutation(num_rows)[:b].astype(np.int32)
    # Decodes (1 token), prefill chunks, and a zero-token request mixed in one step.
    num_new = rng.choice([0, 1, 1, 1, 5, 17, 33], size=b).astype(np.int32)
    num_computed = rng.integers(0, max_len - 33, size=b).astype(np.int32)
    max_blocks = (max_len + block_size - 1) // block_size
    # Distinct, shuffled physical blocks, so a wrong row or block index shows.
    tables = rng.permutation(num_rows * max_blocks).reshape(num_rows, max_blocks).astype(np.int32)
    token_ids = rng.integers(0, 50_000, size=(num_rows, max_len)).astype(np.int32)
    return dict(
        rows=rows,
        num_computed=num_computed,
        num_new=num_new,
        token_ids=token_ids,
        block_tables=tables,
        block_size=block_size,
    )


# The simulator runs every CUDA thread as a Python thread: few cases, one of them past the
# scan's 256-entry chunk (its carry) on purpose.
@pytest.mark.parametrize(
    ("seed", "block_size", "max_reqs"),
    [(0, 1, 1), (1, 16, 1), (2, 1, 7), (3, 16, 7), (4, 16, 7), (5, 16, 300)],
)
def test_kernels_match_reference(seed: int, block_size: int, max_reqs: int) -> None:
    step = random_step(seed, max_reqs, block_size)
    max_tokens = int(step["num_new"].sum()) + 9  # padding rows after the real ones
    ref = step_inputs_ref(**step, max_reqs=max_reqs, max_tokens=max_tokens)
    # Poisoned outputs: every element the kernels must write starts as garbage.
    out = StepInputArrays(
        query_start_loc=np.full(max_reqs + 1, -7, dtype=np.int32),
        seq_lens=np.full(max_reqs, -7, dtype=np.int32),
        positions=np.full(max_tokens, -7, dtype=np.int64),
        input_ids=np.full(max_tokens, -7, dtype=np.int64),
        slot_mapping=np.full(max_tokens, -7, dtype=np.int64),
    )
    launch_step_inputs(**step, out=out, num_reqs=len(step["rows"]))
    total = int(ref.query_start_loc[len(step["rows"])])
    np.testing.assert_array_equal(out.query_start_loc, ref.query_start_loc)
    np.testing.assert_array_equal(out.seq_lens, ref.seq_lens)
    np.testing.assert_array_equal(out.positions[:total], ref.positions[:total])
    np.testing.assert_array_equal(out.input_ids[:total], ref.input_ids[:total])
    np.testing.assert_array_equal(out.slot_mapping, ref.slot_mapping)


def test_reference_matches_the_host_builder_rule() -> None:
    # The rule of worker/input_batch.py, spelled out once by hand.
    step = dict(
        rows=np.array([2, 0], dtype=np.int32),
        num_computed=np.array([0, 9], dtype=np.int32),
        num_new=np.array([6, 1], dtype=np.int32),
        token_ids=np.arange(3 * 16, dtype=np.int32).reshape(3, 16),
        block_tables=np.array([[5, 6, 7, 8], [0, 0, 0, 0], [3, 1, 2, 4]], dtype=np.int32),
        block_size=4,
    )
    ref = step_inputs_ref(**step, max_reqs=3, max_tokens=9)
    assert ref.query_start_loc.tolist() == [0, 6, 7, 7]
    assert ref.seq_lens.tolist() == [6, 10, 0]
    assert ref.positions[:7].tolist() == [0, 1, 2, 3, 4, 5, 9]
    assert ref.input_ids[:7].tolist() == [32, 33, 34, 35, 36, 37, 9]
    # row 2: positions 0-3 in block 3, 4-5 in block 1; row 0: position 9 in block 7
    assert ref.slot_mapping.tolist() == [12, 13, 14, 15, 4, 5, 29, -1, -1]
