"""The HTTP server: health, metrics, the control API and the HLS files."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from broadcaster.metrics import Metrics
from broadcaster.steering_runtime import SteeringRuntime
from chat.events import Role

MAX_PROMPT_CHARS = 500


def _json_error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def make_app(
    *,
    metrics: Metrics,
    health: Callable[[], tuple[bool, dict[str, Any]]],
    state: Callable[[], Awaitable[dict[str, Any]]],
    steering: SteeringRuntime,
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
        return web.json_response(await state(), dumps=lambda o: json.dumps(o, default=str))

    async def body_field(request: web.Request, name: str) -> str | web.Response:
        """The non-empty string field `name` of a JSON body, or the 4xx answer saying what is wrong."""
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _json_error(400, f"body must be JSON with a string field '{name}'")
        value = body.get(name) if isinstance(body, dict) else None
        if not isinstance(value, str) or not value.strip():
            return _json_error(400, f"'{name}' must be a non-empty string")
        value = value.strip()
        if len(value) > MAX_PROMPT_CHARS:
            return _json_error(413, f"'{name}' longer than {MAX_PROMPT_CHARS} characters")
        if any(ord(c) < 32 for c in value):
            return _json_error(400, f"'{name}' contains control characters")
        return value

    async def api_prompt(request: web.Request) -> web.Response:
        prompt = await body_field(request, "prompt")
        if isinstance(prompt, web.Response):
            return prompt
        entry = await steering.steering.enqueue_direct(prompt, "panel")
        return web.json_response({"accepted": True, "queued": entry.entry_id, "prompt": prompt}, status=202)

    async def api_chat(request: web.Request) -> web.Response:
        text = await body_field(request, "text")
        if isinstance(text, web.Response):
            return text
        login = request.query.get("login", "panel")
        role = Role.MODERATOR if request.query.get("role") == "moderator" else Role.VIEWER
        try:
            await steering.local.say(login, text, roles=frozenset({role}))
        except asyncio.QueueFull:
            return _json_error(429, "too many chat messages waiting; slow down")
        return web.json_response({"accepted": True}, status=202)

    async def api_action(request: web.Request) -> web.Response:
        action = request.match_info["action"]
        runtime = steering.steering
        if action == "skip":
            runtime.skip_requested = True
        elif action == "pause":
            runtime.paused = True
        elif action == "resume":
            runtime.paused = False
        elif action == "approve":
            suggestion = await body_field(request, "id")
            if isinstance(suggestion, web.Response):
                return suggestion
            if await runtime.approve(suggestion, by="panel") is None:
                return _json_error(404, f"no suggestion {suggestion!r} in the pool")
        elif action == "ban":
            text = await body_field(request, "text")
            if isinstance(text, web.Response):
                return text
            await runtime.ban(text)
        else:
            return _json_error(404, f"unknown action {action!r}")
        return web.json_response({"accepted": True, "action": action})

    app.middlewares.append(require_token)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_get("/api/state", api_state)
    app.router.add_post("/api/prompt", api_prompt)
    app.router.add_post("/api/chat", api_chat)
    app.router.add_post("/api/{action}", api_action)
    if hls_dir is not None:
        hls_dir.mkdir(parents=True, exist_ok=True)
        app.router.add_static("/hls/", hls_dir, show_index=False)
    return app
