"""The hostile-body corpus against a live gateway (fake engine): nested JSON, huge bodies,
bad UTF-8, wrong types, giant n / max_tokens / logprobs, unicode prompts. Counts answers
by status; any 5xx, any body that is not an OpenAI error object, or a gateway traceback
is a failure.

    python -m scripts.reliability.hostile --rounds 3
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx

from scripts.reliability.cluster import MODEL, cluster
from tests.test_hostile_input import BAD_FIELDS, HOSTILE_BODIES, POST_ROUTES, VALID

UNICODE = [
    "日本語のテキスト",
    "emoji 🎉🧪👩‍👩‍👧",
    "\u0000nul and \u202e bidi",
    "ﷺ" * 50,
    "\ud800 lone",
]


def corpus() -> list[tuple[str, bytes]]:
    items: list[tuple[str, bytes]] = []
    for path in POST_ROUTES:
        items += [(path, b) for b in HOSTILE_BODIES]
        for depth in (1_000, 100_000):
            items.append((path, b"[" * depth + b"]" * depth))
            items.append((path, b'{"prompt": ' + b"{" * depth + b"}" * depth + b"}"))
        items.append((path, b'{"prompt": "' + b"a" * (5 << 20) + b'"}'))  # past the limit
    for path in ("/v1/completions", "/v1/chat/completions"):
        items += [(path, b"{" + VALID + b", " + f + b"}") for f in BAD_FIELDS]
    for text in UNICODE:
        body = {"model": MODEL, "prompt": text, "max_tokens": 3,
                "messages": [{"role": "user", "content": text}]}  # fmt: skip
        raw = json.dumps(body).encode()
        items += [("/v1/completions", raw), ("/v1/chat/completions", raw), ("/tokenize", raw)]
    return items


def run(rounds: int = 1) -> dict[str, Any]:
    statuses: dict[int, int] = {}
    failures: list[str] = []
    with cluster() as c, httpx.Client(base_url=c.base, timeout=60) as http:
        items = corpus()
        for _ in range(rounds):
            for path, body in items:
                r = http.post(path, content=body, headers={"content-type": "application/json"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code >= 500:
                    failures.append(f"{path} {body[:60]!r}: {r.status_code}")
                elif r.status_code >= 400 and "error" not in r.json():
                    failures.append(f"{path} {body[:60]!r}: no error object")
        healthy = http.get("/health").status_code == 200
        tracebacks = c.gateway_log().count("Traceback")
    return {
        "bodies": len(items) * rounds,
        "statuses": dict(sorted(statuses.items())),
        "failures": failures,
        "healthy_after": healthy,
        "gateway_tracebacks": tracebacks,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=1)
    print(json.dumps(run(p.parse_args().rounds), indent=1))


if __name__ == "__main__":
    main()
