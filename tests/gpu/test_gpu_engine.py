"""GPU engine: CUDA graphs equal eager; GPU greedy generation equals the CPU path."""

from __future__ import annotations

import pytest
import torch

from ipc.messages import SamplingParams
from tests.test_golden import check_logprobs_close, prompts_of_different_lengths

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

transformers = pytest.importorskip("transformers")


def generate(path, prompts, max_tokens=24, **engine_args):
    from headrace.llm import LLM

    llm = LLM(str(path), **engine_args)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    out = []
    for r in llm.generate(prompts, params):
        o = r.outputs[0]
        out.append(
            (o.token_ids, [dict(zip(lp.token_ids, lp.logprobs, strict=True)) for lp in o.logprobs])
        )
    graphs = llm.engine.runner.graph_runner is not None
    del llm
    torch.cuda.empty_cache()
    return out, graphs


def tiny_model_hd64(tmp_path, stories_path):
    # head_dim 64 so the CUDA kernels (not the fallback) run.
    import shutil

    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path / "hd64"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories_path / f, path / f)
    return path


def test_stories260k_gpu_equals_cpu(stories_path):
    from gateway.tokenizer import load_tokenizer

    tok = load_tokenizer(str(stories_path))
    prompts = [tok.encode(t) for t in ["Once upon a time", "Lily", "The dog ran to the park and"]]
    cpu, _ = generate(stories_path, prompts, device="cpu")
    gpu, _ = generate(stories_path, prompts, device="cuda", dtype="float32")
    assert [t for t, _ in gpu] == [t for t, _ in cpu]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_graph_replay_equals_eager(tmp_path, stories_path, dtype):
    path = tiny_model_hd64(tmp_path, stories_path)
    prompts = prompts_of_different_lengths()  # 9 requests: a padded batch-16 graph
    args = dict(device="cuda", dtype=dtype, block_size=16, max_num_seqs=32, max_model_len=512)
    eager, used = generate(path, prompts, max_tokens=200, enforce_eager=True, **args)
    assert not used
    graphed, used = generate(path, prompts, max_tokens=200, **args)
    assert used
    # Same kernels on the same inputs: identical tokens, logprobs within rounding.
    check_logprobs_close(graphed, eager, f"graphs-{dtype}", atol=2e-2)


@pytest.mark.parametrize("dtype,atol", [("float16", 0.1), ("bfloat16", 1.0)])
def test_gpu_16bit_equals_cpu_fp32_greedy(tmp_path, stories_path, dtype, atol):
    path = tiny_model_hd64(tmp_path, stories_path)
    prompts = prompts_of_different_lengths()
    cpu, _ = generate(
        path, prompts, device="cpu", block_size=4, num_gpu_blocks=64, max_num_batched_tokens=16
    )
    gpu, _ = generate(path, prompts, device="cuda", dtype=dtype, block_size=32)
    # 16-bit rounding moves logprobs of this peaked random model by up to ~0.05 (fp16) or
    # ~0.3 (bf16): tokens must agree (or be near-ties); a wrong kernel is off by far more.
    check_logprobs_close(gpu, cpu, f"gpu-{dtype}-vs-cpu", atol=atol)


def test_async_scheduling_equals_sync_with_graphs(tmp_path, stories_path):
    path = tiny_model_hd64(tmp_path, stories_path)
    prompts = prompts_of_different_lengths()
    args = dict(device="cuda", dtype="float16", block_size=16, max_num_seqs=32, max_model_len=512)
    sync, used = generate(path, prompts, max_tokens=120, **args)
    assert used
    asyn, used = generate(path, prompts, max_tokens=120, async_scheduling=True, **args)
    assert used
    # Same graphs, same inputs (ids fed on the device): identical tokens and logprobs.
    assert [t for t, _ in asyn] == [t for t, _ in sync]
    check_logprobs_close(asyn, sync, "async", atol=1e-3)
