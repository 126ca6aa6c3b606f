"""The OpenAI API of a real server (worker and gateway processes) on the 260K stories model,
through the official `openai` SDK and raw HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server_harness import (
    Proc,
    free_port,
    health,
    make_chat_model,
    metric,
    start_gateway,
    start_worker,
    wait_healthy,
)

pytestmark = pytest.mark.process

MODEL = "stories"
PROMPT = "Once upon a time"


class Server:
    def __init__(self, base: str, keyed_base: str, procs: list[Proc]) -> None:
        self.base = base
        self.keyed_base = keyed_base  # a second gateway on the same worker, with --api-key
        self.procs = procs
        self.client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tests.conftest import STORIES

    if not (STORIES / "config.json").exists():
        pytest.skip(f"stories260K not found at {STORIES}")
    tmp = tmp_path_factory.mktemp("api")
    model = make_chat_model(STORIES, tmp / "model")
    address = f"ipc://{tmp}/w0.sock"
    worker = start_worker(model, address, tmp, "--served-model-name", MODEL)
    port, port2 = free_port(), free_port()
    gw = start_gateway([address], port, tmp)
    gw2 = start_gateway([address], port2, tmp, "--api-key", "sekret")
    procs = [worker, gw, gw2]
    try:
        wait_healthy(f"http://127.0.0.1:{port}", procs)
        wait_healthy(f"http://127.0.0.1:{port2}", procs)
        yield Server(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port2}", procs)
    finally:
        for p in reversed(procs):
            p.stop()


def post(base: str, path: str, body: object, **kw: object) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=30, **kw)  # type: ignore[arg-type]


def sse_events(r: httpx.Response) -> list[dict | str]:
    out: list[dict | str] = []
    for line in r.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ----------------------------------------------------------------- completions


def test_completion_greedy_matches_reference(server: Server) -> None:
    r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    text = r.choices[0].text
    # README of stories260K: greedy output with transformers.
    assert text.startswith(", there was a little girl named Lily."), text
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.prompt_tokens == 5  # BOS + 4 tokens
    assert r.usage.completion_tokens == 20
    assert r.usage.total_tokens == 25


def test_completion_stream_equals_non_stream_for_same_seed(server: Server) -> None:
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=1.0, seed=1234)
    full = server.client.completions.create(**kw)  # type: ignore[call-overload]
    chunks = list(
        server.client.completions.create(**kw, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == full.choices[0].text
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])


def test_completion_n2_seeded_samples_differ_and_prompt_lists(server: Server) -> None:
    r = server.client.completions.create(
        model=MODEL, prompt=[PROMPT, "The cat"], n=2, max_tokens=12, seed=7, temperature=1.0
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1] or texts[2] != texts[3]
    assert 4 <= r.usage.completion_tokens <= 4 * 12
    cat = post(server.base, "/tokenize", {"model": MODEL, "prompt": "The cat"}).json()["count"]
    assert r.usage.prompt_tokens == 5 + cat  # each prompt counted once, not n times
    ids = server.client.completions.create(model=MODEL, prompt=[1, 400, 300], max_tokens=3)
    assert ids.usage.prompt_tokens == 3


def test_completion_stop_string_cut_across_tokens(server: Server) -> None:
    base = server.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0
    )
    text = base.choices[0].text
    stop = "girl na"  # ends inside the token " named"
    assert stop in text
    r = server.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 30
    chunks = list(
        server.client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs_and_echo(server: Server) -> None:
    r = server.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == 5 and len(lp.token_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0
    for chosen, top, value in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs, strict=True):
        assert value <= 0
        assert chosen in top and 2 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(value)  # greedy picks the most likely
    e = server.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1
    )
    assert e.choices[0].text.startswith(PROMPT)
    elp = e.choices[0].logprobs
    assert elp.token_logprobs[0] is None  # the first prompt token has no logprob
    assert len(elp.tokens) == 5 + 3


def test_raw_sse_framing(server: Server) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes())
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]"
    for f in frames[:-2]:
        assert f.startswith(b"data: {")
        json.loads(f[len(b"data: ") :])


# ----------------------------------------------------------------- chat


def test_chat_non_stream_and_stream(server: Server) -> None:
    messages = [
        {"role": "system", "content": "You tell stories."},
        {"role": "user", "content": [{"type": "text", "text": "Tell me about Lily."}]},
    ]
    kw = dict(model=MODEL, messages=messages, max_tokens=16, seed=3, temperature=0.8)
    r = server.client.chat.completions.create(**kw)  # type: ignore[call-overload]
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0
    chunks = list(
        server.client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}
        )  # type: ignore[call-overload]
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [r.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_chat_n2_logprobs_max_completion_tokens(server: Server) -> None:
    r = server.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        n=2,
        max_completion_tokens=6,
        logprobs=True,
        top_logprobs=3,
        seed=11,
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        content = c.logprobs.content
        assert 1 <= len(content) <= 6
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
        assert "".join(t.token for t in content).startswith(c.message.content[:1])


# ----------------------------------------------------------------- other routes


def test_models_health_tokenize_detokenize(server: Server) -> None:
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    h = health(server.base)
    assert h["status"] == "ok" and h["workers"][0]["state"] == "up"
    t = post(server.base, "/tokenize", {"model": MODEL, "prompt": PROMPT}).json()
    assert t["count"] == 5 and t["max_model_len"] == 512 and t["tokens"][0] == 1
    d = post(server.base, "/detokenize", {"model": MODEL, "tokens": t["tokens"]}).json()
    assert d["prompt"] == PROMPT
    chat = post(server.base, "/tokenize", {"messages": [{"role": "user", "content": "x"}]}).json()
    assert chat["count"] > 3


def test_metrics_names(server: Server) -> None:
    server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    text = httpx.get(f"{server.base}/metrics").text
    for name in (
        "headrace:num_requests_running",
        "headrace:num_requests_waiting",
        "headrace:kv_cache_usage_perc",
        "headrace:prompt_tokens_total",
        "headrace:generation_tokens_total",
        "headrace:prefix_cache_queries_total",
        "headrace:prefix_cache_hits_total",
        "headrace:time_to_first_token_seconds_bucket",
        "headrace:time_per_output_token_seconds_bucket",
        "headrace:e2e_request_latency_seconds_count",
    ):
        assert name in text, name
    assert metric(server.base, "headrace:generation_tokens_total") >= 3
    assert metric(server.base, "headrace:request_success_total", finished_reason="length") >= 1


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "prompt": PROMPT, "max_tokens": "ten"}, "max_tokens"),
        ({"model": MODEL, "prompt": PROMPT, "temperature": -1}, "temperature"),
        ({"model": MODEL, "prompt": PROMPT, "n": 0}, "n"),
        ({"model": MODEL, "prompt": PROMPT, "top_p": 1.5}, "top_p"),
        ({"model": MODEL, "prompt": PROMPT, "logprobs": 99}, "logprobs"),
        ({"model": MODEL, "prompt": "word " * 600}, "prompt"),
        ({"model": MODEL, "prompt": PROMPT, "max_tokens": 600}, "max_tokens"),
        ({"model": MODEL, "prompt": [1, 99999]}, "prompt"),
        ({"model": MODEL}, "prompt"),
    ],
)
def test_400_errors(server: Server, body: dict, param: str) -> None:
    r = post(server.base, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["code"] == 400
    assert err["message"]


def test_invalid_json_and_sdk_errors(server: Server) -> None:
    r = httpx.post(
        f"{server.base}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "error" in r.json()
    with pytest.raises(openai.NotFoundError) as e:
        server.client.completions.create(model="no-such-model", prompt=PROMPT)
    assert e.value.status_code == 404
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model=MODEL, messages=[], max_tokens=3)
    # One bad request disturbs nothing: the next one is fine.
    ok = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_401_on_wrong_or_missing_key(server: Server) -> None:
    keyed = server.keyed_base
    assert httpx.get(f"{keyed}/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=f"{keyed}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    good = openai.OpenAI(base_url=f"{keyed}/v1", api_key="sekret", max_retries=0)
    r = good.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert r.usage.completion_tokens == 2
    assert httpx.get(f"{keyed}/health").status_code == 200  # not under /v1


# ----------------------------------------------------------------- cancellation


def test_disconnect_aborts_and_frees_kv_blocks(server: Server) -> None:
    base = server.base
    total = metric(base, "headrace:num_kv_blocks_total")
    assert metric(base, "headrace:num_kv_blocks_free") == total
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        h = health(base)["workers"][0]
        assert h["num_running"] == 1 and h["num_free_blocks"] < total
    closed = time.monotonic()  # leaving the block closed the connection mid-stream
    while time.monotonic() - closed < 5:
        h = health(base)["workers"][0]
        if h["num_running"] == 0 and h["num_free_blocks"] == total:
            break
        time.sleep(0.02)
    assert h["num_running"] == 0 and h["num_free_blocks"] == total, h
    assert time.monotonic() - closed < 1.0
    gen = metric(base, "headrace:generation_tokens_total")
    time.sleep(0.3)
    assert metric(base, "headrace:generation_tokens_total") == gen  # nothing runs on


def test_chat_template_missing_is_400(tmp_path: Path, stories_path: Path) -> None:
    import asyncio

    from gateway.engine_client import ModelEntry
    from gateway.errors import BadRequest
    from gateway.protocol import ChatMessage
    from gateway.serving_chat import chat_prompt_ids
    from gateway.tokenizer import load_tokenizer
    from ipc.messages import ModelInfo

    async def run() -> None:
        info = ModelInfo("m", str(stories_path), 512, 512, "w")
        entry = ModelEntry("m", info, tokenizer=load_tokenizer(str(stories_path)))
        with pytest.raises(BadRequest) as e:
            chat_prompt_ids(entry, [ChatMessage("user", "hi")])
        assert "chat template" in e.value.message

    asyncio.run(run())
