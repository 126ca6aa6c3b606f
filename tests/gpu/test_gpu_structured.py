"""Structured output on the GPU: the bitmask applied on device equals the CPU result, and
a CUDA-graph engine's constrained outputs follow their grammar and match the CPU's."""

from __future__ import annotations

import json

import pytest
import torch

from ipc.messages import GrammarKind, GuidedDecoding, SamplingParams
from worker.structured import apply_bitmask

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.mark.parametrize("vocab", [128256, 32000, 100])
def test_apply_bitmask_cuda_equals_cpu(vocab):
    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    logits = torch.randn(64, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (64, words), dtype=torch.int32, generator=gen)
    bitmask[3] = -1  # an unconstrained row
    cpu = logits.clone()
    apply_bitmask(cpu, bitmask)
    gpu = logits.cuda()
    apply_bitmask(gpu, bitmask.cuda())
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(cpu[3], logits[3])


def test_constrained_generation_gpu_equals_cpu(stories_path):
    from headrace import LLM

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    guided = GuidedDecoding(GrammarKind.JSON_SCHEMA, json.dumps(schema))
    prompts = ["Once upon a time", "Lily", "The dog"]
    params = [
        SamplingParams(temperature=0, max_tokens=48, guided=guided),
        SamplingParams(temperature=0, max_tokens=16),
        SamplingParams(temperature=0, max_tokens=48, guided=guided),
    ]
    outs = {}
    for device in ("cpu", "cuda"):
        llm = LLM(str(stories_path), device=device, dtype="float32", max_num_seqs=8)
        outs[device] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        text = llm.generate(prompts[:1], params[:1])[0].outputs[0].text
        assert set(json.loads(text)) == {"name", "n"}
        del llm
    assert outs["cuda"] == outs["cpu"]
