"""Golden tests for Falcon, GPT-NeoX and Mixtral: greedy tokens and logprobs against
Hugging Face transformers on tiny random models (tests/tiny_models.py LAYOUTS), with
test_golden.py's engine settings (block_size 4, chunked prefill, preemption) and checks."""

from __future__ import annotations

import pytest

from tests.test_golden import (
    ENGINE_ARGS,
    check_logprobs_close,
    hf_greedy,
    prompts_of_different_lengths,
    run_headrace,
)
from tests.tiny_models import LAYOUTS, make_tiny_model

pytestmark = pytest.mark.golden


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_tiny_models_match_transformers(kind, tmp_path, stories_path):
    path = make_tiny_model(kind, tmp_path / kind, stories_path)
    prompts = prompts_of_different_lengths()
    ours, engine = run_headrace(path, prompts, **ENGINE_ARGS)
    assert engine.scheduler.num_preemptions > 0, "the test meant to force preemption"
    check_logprobs_close(ours, hf_greedy(path, prompts), kind)
