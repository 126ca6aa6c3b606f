"""The chat page's routes and files (in process, no workers), `--disable-chat-page`, and
the 503 that requests get while the server is still starting."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from gateway.app import GatewayConfig, build_app

STATIC = resources.files("gateway") / "static"


def _config(tmp_path: Path, **kw: object) -> GatewayConfig:
    # A worker address nobody binds: the gateway stays "starting" for the whole test.
    return GatewayConfig(workers=[f"ipc://{tmp_path}/nobody.sock"], **kw)  # type: ignore[arg-type]


def test_chat_page_is_served_with_its_files_and_a_csp(tmp_path: Path) -> None:
    client = TestClient(build_app(_config(tmp_path)))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    srcs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(srcs) == ["/static/chat.css", "/static/chat.js"]  # nothing from elsewhere
    for path, kind in (("/static/chat.js", "javascript"), ("/static/chat.css", "css")):
        r = client.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path


def test_disable_chat_page(tmp_path: Path) -> None:
    client = TestClient(build_app(_config(tmp_path, chat_page=False)))
    assert client.get("/").status_code == 404
    assert client.get("/static/chat.js").status_code == 404


def test_chat_page_from_args() -> None:
    import argparse

    from headrace.gateway_cmd import add_gateway_args, gateway_config_from_args

    p = argparse.ArgumentParser()
    add_gateway_args(p)
    assert gateway_config_from_args(p.parse_args(["--worker", "tcp://127.0.0.1:5555"])).chat_page
    args = p.parse_args(["--worker", "tcp://127.0.0.1:5555", "--disable-chat-page"])
    assert not gateway_config_from_args(args).chat_page


@pytest.mark.parametrize("name", ["chat.js", "chat.html"])
def test_page_never_parses_text_as_html_and_needs_no_network(name: str) -> None:
    text = (STATIC / name).read_text()
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert banned not in text, banned
    assert not re.search(r"https?://", text), "no CDN or other origin"


def test_requests_before_ready_get_503_saying_so(tmp_path: Path) -> None:
    with TestClient(build_app(_config(tmp_path))) as client:  # lifespan: connects, waits
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "starting" in message and "try again" in message, message
        r = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        assert r.status_code == 503 and "starting" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 503
        models = client.get("/v1/models")
        assert models.status_code == 200 and models.json()["data"] == []
