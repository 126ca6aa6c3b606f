"""The built-in chat page at `/` (turned off by `--disable-chat-page`).

Three static files shipped as package data in gateway/static/ (see pyproject.toml's
package-data): no CDN, no build step, nothing fetched from the internet. The page talks to
this server's own /v1/models and /v1/chat/completions; a Content-Security-Policy that allows
only this origin's scripts backs up its rule of inserting model output as text only.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

FILES = {
    "/": ("chat.html", "text/html; charset=utf-8"),
    "/static/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/static/chat.css": ("chat.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def chat_page_routes() -> list[Route]:
    """GET routes for the page and its script and stylesheet, read once from the package."""
    static = resources.files("gateway") / "static"
    routes = []
    for path, (name, media_type) in FILES.items():
        body = (static / name).read_bytes()

        async def serve(
            request: Request, body: bytes = body, media_type: str = media_type
        ) -> Response:
            return Response(body, media_type=media_type, headers=HEADERS)

        routes.append(Route(path, serve, methods=["GET"]))
    return routes
