"""Offline generation end to end: the CLI, the LLM class, GGUF chat, model-folder errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ipc.messages import EngineRequest, FinishReason, SamplingParams

STORIES_GREEDY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too "
    "high.\nLily"
)


def headrace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "headrace", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.process
def test_cli_generate_stories_greedy(stories_path):
    r = headrace(
        "generate",
        "--model",
        str(stories_path),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "60",
        "--temperature",
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == STORIES_GREEDY


@pytest.mark.process
def test_cli_generate_json(stories_path):
    r = headrace(
        "generate",
        "--model",
        str(stories_path),
        "--prompt",
        "Once upon a time",
        "--prompt",
        "Lily",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--json",
        "--block-size",
        "4",
        "--max-num-seqs",
        "2",
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert len(lines) == 2
    assert STORIES_GREEDY.startswith("Once upon a time" + lines[0]["text"])
    assert all(len(o["token_ids"]) == 8 for o in lines)


@pytest.mark.process
def test_cli_bad_flag_is_a_clear_error(stories_path):
    r = headrace("generate", "--model", str(stories_path), "--prompt", "x", "--block-size", "3")
    assert r.returncode == 2
    assert "block_size" in r.stderr and "Traceback" not in r.stderr


def test_llm_generate_token_ids_and_n(stories_path):
    from headrace.llm import LLM

    llm = LLM(str(stories_path), device="cpu")
    res = llm.generate(
        [[1, 403, 407, 261, 378]], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5)
    )
    outs = res[0].outputs
    assert [o.index for o in outs] == [0, 1, 2]
    assert all(len(o.token_ids) == 5 and o.finish_reason == "length" for o in outs)
    again = llm.generate(
        [[1, 403, 407, 261, 378]], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5)
    )
    assert [o.token_ids for o in again[0].outputs] == [o.token_ids for o in outs]


def test_stop_string_and_stop_token(stories_path):
    from headrace.llm import LLM

    llm = LLM(str(stories_path), device="cpu")
    r = llm.generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=60, stop=["Lily"])
    )[0]
    o = r.outputs[0]
    assert o.text == ", there was a little girl named " and o.finish_reason == "stop"
    assert o.stop_reason == "Lily"
    full = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=20))[0]
    ids = full.outputs[0].token_ids
    stop_id = next(t for i, t in enumerate(ids) if i >= 3 and t not in ids[:i])
    r = llm.generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=60, stop_token_ids=[stop_id])
    )[0]
    assert r.outputs[0].token_ids == ids[: ids.index(stop_id) + 1]
    assert r.outputs[0].stop_reason == stop_id and r.outputs[0].finish_reason == "stop"


def test_prompt_logprobs(stories_path):
    from headrace.llm import LLM

    llm = LLM(str(stories_path), device="cpu", block_size=4, max_num_batched_tokens=3)
    r = llm.generate(
        [[1, 403, 407, 261, 378]], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    )[0]
    plp = r.prompt_logprobs
    assert plp is not None and plp[0] is None and len(plp) == 5
    assert [p.token_ids[0] for p in plp[1:]] == [403, 407, 261, 378]
    assert all(p.logprobs[0] <= 0 and len(p.token_ids) == 3 for p in plp[1:])


def test_engine_rejects_bad_requests_without_disturbing_others(stories_path):
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    e = EngineCore(EngineConfig(model=str(stories_path), device="cpu", max_model_len=64))
    assert (
        e.add_request(EngineRequest("ok", [1, 403], SamplingParams(max_tokens=4, temperature=0)))
        is None
    )
    cases = {
        "long": ([1] * 64, SamplingParams(), "maximum context length"),
        "vocab": ([1, 9999], SamplingParams(), "out of range"),
        "empty": ([], SamplingParams(), "empty"),
        "temp": ([1], SamplingParams(temperature=-1), "temperature"),
        "maxtok": ([1, 2], SamplingParams(max_tokens=100), "maximum context length"),
    }
    for rid, (prompt, params, words) in cases.items():
        out = e.add_request(EngineRequest(rid, prompt, params))
        assert out is not None and out.finish_reason == FinishReason.ERROR, rid
        assert words in (out.error or ""), (rid, out.error)
    toks = []
    while e.has_unfinished_requests():
        for o in e.step():
            toks += o.new_token_ids
    assert len(toks) == 4


def test_request_that_cannot_fit_alone_is_rejected_at_admission(stories_path):
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    e = EngineCore(
        EngineConfig(model=str(stories_path), device="cpu", block_size=4, num_gpu_blocks=4)
    )
    out = e.add_request(EngineRequest("big", [1] * 10, SamplingParams(max_tokens=10)))
    assert out is not None and "KV cache blocks" in (out.error or "")


def test_smollm2_gguf_chat_answers_paris(smollm2_path):
    from headrace.llm import LLM

    llm = LLM(str(smollm2_path), device="cpu")
    r = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=20),
    )[0]
    assert "Paris" in r.outputs[0].text


# ---- model folders that are wrong ---------------------------------------------------------------
def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def engine_error(path: Path) -> str:
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    with pytest.raises(ValueError) as e:
        EngineCore(EngineConfig(model=str(path), device="cpu"))
    return str(e.value)


def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    msg = engine_error(tmp_path)
    assert "config.json" in msg


def test_unknown_architecture(tmp_path, stories_path):
    path = copy_model(stories_path, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    msg = engine_error(path)
    assert "GPTBigCodeForCausalLM" in msg and "not supported" in msg


def test_missing_tensor_and_shape_mismatch(tmp_path, stories_path):
    path = copy_model(stories_path, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.2.self_attn.k_proj.weight"
    broken = {k: v for k, v in tensors.items() if k != name}
    save_file(broken, path / "model.safetensors")
    msg = engine_error(path)
    assert name in msg and "missing" in msg
    broken = dict(tensors)
    broken[name] = torch.zeros(3, 3)
    save_file(broken, path / "model.safetensors")
    msg = engine_error(path)
    assert name in msg and "(3, 3)" in msg
