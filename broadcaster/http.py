"""The HTTP server: health, metrics, the control API and the HLS files."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from broadcaster.metrics import Metrics

MAX_PROMPT_CHARS = 500


def _json_error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def make_app(
    *,
    metrics: Metrics,
    health: Callable[[], tuple[bool, dict[str, Any]]],
    state: Callable[[], dict[str, Any]],
    switch_prompt: Callable[[str], int],
    api_token: str,
    hls_dir: Path | None,
) -> web.Application:
    """Build the aiohttp application; the service passes in what each route reads or does."""
    app = web.Application(client_max_size=64 * 1024)

    async def healthz(_: web.Request) -> web.Response:
        ok, parts = health()
        return web.json_response({"status": "ok" if ok else "failing", "time": time.time(), **parts},
                                 status=200 if ok else 503, dumps=lambda o: json.dumps(o, default=str))

    async def metrics_route(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    def authorised(request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_token.encode())

    @web.middleware
    async def require_token(request: web.Request, handler):
        if request.path.startswith("/api/") and not authorised(request):
            return _json_error(401, "missing or wrong bearer token (PROMPTCAST_API_TOKEN)")
        return await handler(request)

    async def api_state(_: web.Request) -> web.Response:
        return web.json_response(state(), dumps=lambda o: json.dumps(o, default=str))

    async def api_prompt(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _json_error(400, "body must be JSON: {\"prompt\": \"...\"}")
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            return _json_error(400, "'prompt' must be a non-empty string")
        prompt = prompt.strip()
        if len(prompt) > MAX_PROMPT_CHARS:
            return _json_error(413, f"prompt longer than {MAX_PROMPT_CHARS} characters")
        if any(ord(c) < 32 for c in prompt):
            return _json_error(400, "prompt contains control characters")
        seq = switch_prompt(prompt)
        return web.json_response({"accepted": True, "switch": seq, "prompt": prompt}, status=202)

    app.middlewares.append(require_token)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_get("/api/state", api_state)
    app.router.add_post("/api/prompt", api_prompt)
    if hls_dir is not None:
        hls_dir.mkdir(parents=True, exist_ok=True)
        app.router.add_static("/hls/", hls_dir, show_index=False)
    return app
