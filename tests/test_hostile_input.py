"""The gateway under hostile input: every body that is not a valid request is a 400 (never a
500), oversized bodies are a 413 before they are read, slow or half-open clients are cut
off, large bodies never freeze other streams, and the OpenAI API's gaps are closed.

One fake-engine worker (no model: the llama3 tokenizer) behind one gateway, so each test
costs milliseconds of engine time.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.server_harness import Proc, free_port, start_gateway, start_worker, wait_healthy

pytestmark = pytest.mark.reliability

MODEL = "fake"
POST_ROUTES = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
BODY_LIMIT = 8 << 20  # large enough that a 4 MB body is read, decoded and tokenized


class Gateway:
    def __init__(self, base: str, port: int, procs: list[Proc]) -> None:
        self.base = base
        self.port = port
        self.procs = procs

    def log(self) -> str:
        return self.procs[-1].log.read_text(errors="replace")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    from tests.conftest import LLAMA3_TOKENIZER

    tmp = tmp_path_factory.mktemp("hostile")
    model = tmp / "model"
    shutil.copytree(LLAMA3_TOKENIZER, model)
    address = f"ipc://{tmp}/fake.sock"
    worker = start_worker(
        model, address, tmp, "--fake-engine", "--fake-step-ms", "5", "--served-model-name", MODEL
    )
    port = free_port()
    gateway = start_gateway(
        [address],
        port,
        tmp,
        "--max-request-body-bytes", str(BODY_LIMIT),
        "--request-body-timeout", "1",
        "--request-header-timeout", "1",
        "--allowed-origins", '["https://ui.example"]',
    )  # fmt: skip
    procs = [worker, gateway]
    try:
        wait_healthy(f"http://127.0.0.1:{port}", procs)
        yield Gateway(f"http://127.0.0.1:{port}", port, procs)
    finally:
        for p in reversed(procs):
            p.stop()


def post_raw(gw: Gateway, path: str, content: bytes, **headers: str) -> httpx.Response:
    h = {"content-type": "application/json", **headers}
    return httpx.post(f"{gw.base}{path}", content=content, headers=h, timeout=30)


def assert_400(r: httpx.Response, param: str | None = None) -> None:
    assert r.status_code == 400, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param, err


# ------------------------------------------------------------------ 3. bodies that are not requests


@pytest.mark.parametrize("path", POST_ROUTES)
@pytest.mark.parametrize("depth", [2_000, 200_000])
def test_deeply_nested_json_is_400(gw: Gateway, path: str, depth: int) -> None:
    for body in (b"[" * depth + b"]" * depth, b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"):
        assert_400(post_raw(gw, path, body))


# Not a request on any route: not JSON, not an object, wrong types, out-of-range ids.
HOSTILE_BODIES: list[bytes] = [
    b"",
    b"null",
    b"[]",
    b'"a string"',
    b"123",
    b"{not json",
    b'{"model": "fake", "prompt": "x"} trailing',
    b'{"model": "fake", "prompt": "\xff\xfe bad utf-8", "messages": "\xff"}',
    b'{"model": ["fake"], "prompt": "x", "tokens": [1]}',
    b'{"model": "fake", "prompt": {"a": 1}, "messages": {"a": 1}, "tokens": {"a": 1}}',
    b'{"model": "fake", "prompt": [-1], "messages": [{"role": 5}], "tokens": [-5, 99999999999]}',
    b'{"model": "fake", "prompt": true, "messages": "hello", "tokens": "abc"}',
    b'{"model": "fake", "prompt": [[1, 2], "x"], "messages": [], "tokens": [1e400]}',
    b'{"model": "fake", "prompt": "x", "temperature": NaN, "tokens": [NaN]}',
]

# A valid completions and chat request but for one field.
VALID = b'"model": "fake", "prompt": "x", "messages": [{"role": "user", "content": "x"}]'
BAD_FIELDS = [
    b'"max_tokens": 1e400',
    b'"max_tokens": 100000000000000000000000000',
    b'"max_tokens": -5',
    b'"n": 1000000000',
    b'"logprobs": 1000000, "top_logprobs": 1000000',
    b'"prompt_logprobs": 1000000',
    b'"seed": -99999999999999999999999',
    b'"temperature": 1e400',
    b'"top_p": "high"',
    b'"stop": [""]',
    b'"stream": "yes"',
    b'"stream_options": [1]',
    b'"max_tokens": "\\ud800"',
]


@pytest.mark.parametrize("path", POST_ROUTES)
def test_hostile_bodies_are_400(gw: Gateway, path: str) -> None:
    bodies = list(HOSTILE_BODIES)
    if path.startswith("/v1/"):
        bodies += [b"{" + VALID + b", " + field + b"}" for field in BAD_FIELDS]
    for body in bodies:
        r = post_raw(gw, path, body)
        assert r.status_code == 400, (body[:80], r.status_code, r.text[:300])
        assert r.json()["error"]["type"] == "invalid_request_error"
    # Nothing above disturbed the server.
    assert httpx.get(f"{gw.base}/health", timeout=5).status_code == 200


def test_unicode_prompts_are_served(gw: Gateway) -> None:
    for prompt in ["日本語のテキスト", "emoji 🎉🧪👩‍👩‍👧", "\u0000nul and \u202e bidi", "ﷺ" * 50]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 3}
        r = httpx.post(f"{gw.base}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3


# ------------------------------------------------------------------ 4. huge bodies


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    """Send `head` (and `body`), return whatever the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"}" in chunk:
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def test_oversized_content_length_is_413_before_the_body(gw: Gateway) -> None:
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (BODY_LIMIT + 1)
    )
    t0 = time.monotonic()
    answer = raw_request(gw.port, head, b'{"prompt": "')  # the body never comes
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"max-request-body-bytes" in answer
    assert time.monotonic() - t0 < 0.9  # answered at once, not after the body timeout


def test_oversized_chunked_body_is_413(gw: Gateway) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "fake", "prompt": "'
        for _ in range(BODY_LIMIT // (1 << 20) + 2):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = httpx.post(f"{gw.base}/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413, r.text[:200]
    assert r.json()["error"]["param"] is None and "bytes" in r.json()["error"]["message"]


def _stream_gaps(base: str, stop: threading.Event, gaps: list[float]) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 8000, "stream": True}
    body["ignore_eos"] = True
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
        last = time.monotonic()
        for _line in r.iter_lines():
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            if stop.is_set():
                break


def test_large_body_does_not_freeze_other_streams(gw: Gateway) -> None:
    """While a 1.6 MB prompt is read, decoded and tokenized, a running stream's tokens and
    /health keep coming: no gap is more than a small part of the big request's time (a
    ratio, so a loaded CI machine slowing everything alike does not fail it)."""
    text = "The mill stood by the river, and a channel of cold water ran. " * 25_000
    stop = threading.Event()
    gaps: list[float] = []
    streamer = threading.Thread(target=_stream_gaps, args=(gw.base, stop, gaps))
    streamer.start()
    health: list[tuple[float, float]] = []  # (start, latency)

    def poll_health() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            httpx.get(f"{gw.base}/health", timeout=60)
            health.append((t0, time.monotonic() - t0))
            time.sleep(0.02)

    poller = threading.Thread(target=poll_health)
    try:
        while len(gaps) < 20 and streamer.is_alive():
            time.sleep(0.05)
        poller.start()
        for path, body in [
            ("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}),
            ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]}),
            ("/tokenize", {"model": MODEL, "prompt": text}),
        ]:  # fmt: skip
            before = len(gaps)
            t0 = time.monotonic()
            r = httpx.post(f"{gw.base}{path}", json=body, timeout=120)
            took = time.monotonic() - t0
            assert r.status_code in (200, 400), r.text[:200]  # 400: longer than the context
            during = gaps[before:]
            assert len(during) > 1, (path, took)
            assert max(during) < 0.5 * took + 0.1, (path, max(during), took)
            pings = [lat for start, lat in health if t0 <= start <= t0 + took]
            assert pings and max(pings) < 0.5 * took + 0.1, (path, max(pings), took)
    finally:
        stop.set()
        streamer.join()
        if poller.is_alive():
            poller.join()


# ------------------------------------------------------------------ 6./7. slow and half-open clients


def test_half_open_and_slow_clients_are_cut_off_quietly(gw: Gateway) -> None:
    conns = []
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        if i % 2:  # headers that never finish
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        else:  # a body that never finishes
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b'\r\nContent-Length: 1000\r\n\r\n{"prompt": '
            )
        conns.append(s)
    t0 = time.monotonic()
    closed = 0
    for s in conns:
        s.settimeout(max(0.1, 5 - (time.monotonic() - t0)))
        try:
            while s.recv(65536):
                pass
            closed += 1
        except (TimeoutError, ConnectionResetError):
            pass
        s.close()
    assert closed == len(conns)
    assert time.monotonic() - t0 < 4  # 1 s timeouts, checked at least every half second
    # A client that disconnects mid-body is one quiet line, not an ERROR traceback.
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", gw.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")
        s.close()
    time.sleep(0.5)
    log = gw.log()
    assert "Traceback" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]


# ------------------------------------------------------------------ 8. OpenAI API gaps


def test_models_retrieve(gw: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{gw.base}/v1", api_key="x", max_retries=0)
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_cors(gw: Gateway) -> None:
    pre = httpx.options(
        f"{gw.base}/v1/chat/completions",
        headers={
            "Origin": "https://ui.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert pre.status_code == 200, pre.text
    assert pre.headers["access-control-allow-origin"] == "https://ui.example"
    r = httpx.get(f"{gw.base}/v1/models", headers={"Origin": "https://ui.example"})
    assert r.headers["access-control-allow-origin"] == "https://ui.example"
    other = httpx.get(f"{gw.base}/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 3}, "temperature"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
        ("/v1/completions", {"model": "", "prompt": "x"}, "model"),
        ("/v1/completions", {"prompt": "x"}, "model"),
    ],
)
def test_refused_like_openai(gw: Gateway, path: str, body: dict, param: str) -> None:
    assert_400(httpx.post(f"{gw.base}{path}", json=body, timeout=30), param)


def test_openapi_schema(gw: Gateway) -> None:
    r = httpx.get(f"{gw.base}/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.")
    for path in [*POST_ROUTES, "/v1/models"]:
        assert path in spec["paths"], path
    post_op = spec["paths"]["/v1/completions"]["post"]
    ref = post_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    name = ref.rsplit("/", 1)[1]
    props = spec["components"]["schemas"][name]["properties"]
    assert {"prompt", "max_tokens", "temperature", "model"} <= set(props)
    assert props["temperature"]["anyOf"][0]["maximum"] == 2
