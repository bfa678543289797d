"""The HTTP server: control panel, OBS overlays, event stream, control API, health, metrics, HLS.

Every route is one row of `ROUTES`: `make_app` registers exactly those rows and
`/api/openapi.json` documents exactly those rows (`broadcaster/openapi.py`), so the
document cannot drift from the server. Around every request, outermost first:

    CORS (closed unless server.cors_origins) -> rate limit per client address (token bucket)
      -> JSON errors (404/405/413 from aiohttp too) -> bearer token for /api/* -> the handler
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from broadcaster.metrics import Metrics
from broadcaster.openapi import Param, Reply, Route, document
from broadcaster.steering_runtime import SteeringRuntime
from chat.events import Role
from chat.moderation import clean_text
from chat.store import StoreUnavailable

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
MAX_PROMPT_CHARS = 500
MAX_BODY_BYTES = 64 * 1024
RATE_PER_S = 20.0  # requests per second per client address, sustained
RATE_BURST = 40  # ... and in one burst
SSE_POLL_S = 0.25  # how often the event stream reads the steering state
SSE_HEARTBEAT_S = 15.0
SSE_MAX_CLIENTS = 500
SSE_MAX_PER_CLIENT = 10
STORE_RETRY_AFTER_S = 2
LOGIN = re.compile(r"[A-Za-z0-9_]{1,25}")  # Twitch's rule for logins; also what the panel sends

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'self'; "
            "object-src 'none'")

_TEXT = Reply(description="Prometheus text", schema=None, media_type="text/plain")
_HTML = Reply(description="an HTML page", schema=None, media_type="text/html")
_OVERLAY_QUERY = (
    Param("theme", "dark (default) or light", {"enum": ["dark", "light"]}),
    Param("position", "bottom (default) or top", {"enum": ["bottom", "top"]}),
    Param("accent", "accent colour, URL-encoded (%23ff4f9a)",
          {"type": "string", "pattern": "^#[0-9a-fA-F]{3,8}$"}),
    Param("scale", "size factor, 0.25 to 4 (default 1)", {"type": "number", "minimum": 0.25, "maximum": 4}),
)

ROUTES: tuple[Route, ...] = (
    # pages (token-free; the panel asks for the token itself)
    Route("GET", "/", "page_panel", "control panel", auth=False, tag="pages", reply=_HTML,
          description="Preview (WHEP), what is on air, round, queue, pool, moderator actions, output "
                      "and engine status. `?view=preview`: the preview alone, for an OBS Browser Source."),
    Route("GET", "/overlay/poll", "page_overlay_poll", "OBS overlay: the vote", auth=False, tag="pages",
          reply=_HTML, query=_OVERLAY_QUERY),
    Route("GET", "/overlay/now", "page_overlay_now", "OBS overlay: the prompt on air (lower third)",
          auth=False, tag="pages", reply=_HTML, query=_OVERLAY_QUERY),
    # read-only, token-free
    Route("GET", "/events", "events", "server-sent events: the steering state", auth=False, tag="read-only",
          reply=Reply(description="`text/event-stream`: an `event: state` (data: StateEvent JSON) at "
                                  "connect and whenever it changes; a `: heartbeat` comment every 15 s",
                      schema=None, media_type="text/event-stream"),
          errors={429: "too many event streams from this address (server.events_per_client)",
                  503: "too many event streams open"}),
    Route("GET", "/healthz", "healthz", "liveness and every part's status", auth=False, tag="read-only",
          reply=Reply(description="ok", schema="Health"), errors={503: "failing (same document)"}),
    Route("GET", "/metrics", "metrics", "Prometheus metrics", auth=False, tag="read-only", reply=_TEXT),
    Route("GET", "/api/openapi.json", "openapi", "this document", auth=False, tag="read-only",
          reply=Reply(description="OpenAPI 3.1", schema=None)),
    # the control API (bearer token)
    Route("GET", "/api/state", "state", "what is on air, the round with its tally, the queue, the pool",
          reply=Reply(description="the state", schema="State")),
    Route("POST", "/api/prompt", "prompt", "queue a prompt and play it at the next block",
          body="PromptRequest", reply=Reply(202, "queued")),
    Route("POST", "/api/chat", "chat", "a chat line through the local source", body="ChatRequest",
          query=(Param("login", "who says it (default: panel)",
                       {"type": "string", "pattern": "^[A-Za-z0-9_]{1,25}$"}),
                 Param("role", "viewer (default) or moderator", {"enum": ["viewer", "moderator"]})),
          reply=Reply(202, "handled by steering: whatever it added is stored; `reply` says what it did")),
    Route("POST", "/api/skip", "skip", "play the next queued prompt now"),
    Route("POST", "/api/veto", "veto", "drop the next queued prompt, or veto option n of the round",
          body="VetoRequest", body_required=False,
          errors={409: "no open round (with option), or nothing queued (without)"}),
    Route("POST", "/api/pause", "pause", "stop applying chat (rounds go on)"),
    Route("POST", "/api/resume", "resume", "apply chat again"),
    Route("POST", "/api/approve", "approve", "manual mode: queue a pool suggestion", body="ApproveRequest",
          errors={404: "no such suggestion in the pool"}),
    Route("POST", "/api/ban", "ban", "ban a prompt text (and drop matching pool entries)", body="BanRequest"),
    # operations: the programme and the engine
    Route("GET", "/api/schedule", "schedule", "the programme now: window, playlist, prompt, autopilot",
          reply=Reply(description="the programme", schema="Schedule")),
    Route("POST", "/api/schedule/reload", "schedule_reload",
          "re-read the channel file's schedule (as SIGHUP does); the stream goes on",
          reply=Reply(description="reloaded", schema="ScheduleReload"),
          errors={409: "the channel runs the embedded config: no file to re-read",
                  422: "the file has problems (listed); the running programme stays"}),
    Route("POST", "/api/reanchor", "reanchor",
          "renew the engine's attention sink from recent frames at the next block (no cut)"),
)


PUBLIC_API = frozenset(r.path for r in ROUTES if r.path.startswith("/api/") and not r.auth)


def _json_error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)


class Operations(Protocol):
    """What the running channel offers the API besides steering (broadcaster/service.py)."""

    config_path: str | None

    def schedule_status(self) -> dict[str, Any]: ...

    async def reload_schedule(self) -> tuple[bool, list[str]]: ...

    def reanchor(self) -> None: ...


class RateLimiter:
    """A token bucket per client address: `rate` requests a second, bursts of `burst`."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 10_000):
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when)

    def take(self, key: str) -> float:
        """Spend a token: 0.0 when allowed, else the seconds until the next token."""
        now = self.clock()
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_clients:
                self._prune(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = [k for k, (t, w) in self._buckets.items() if t + (now - w) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) > self.max_clients:  # many busy addresses: forget the quietest half
            keep = sorted(self._buckets.items(), key=lambda kv: kv[1][1])[len(self._buckets) // 2:]
            self._buckets = dict(keep)


def _winner(round_: dict, steering: dict, min_votes: int) -> dict | None:
    """The winning option of a closed round, by the rule steering applies (vetoed options cannot win)."""
    options = round_["options"]
    tally = [0 if o["vetoed"] else o["votes"] for o in options]
    if not tally or sum(tally) < max(1, min_votes) or max(tally) == 0:
        return None
    leaders = [o for o, n in zip(options, tally, strict=True) if n == max(tally)]
    if len(leaders) > 1:  # a random tie-break: the queue (or the air) knows which one won
        played = [steering.get("now_playing") or {}, *steering.get("queue", ())]
        chosen = {p.get("chosen_by") for p in played}
        leaders = [o for o in leaders if f"@{o['by']} (vote)" in chosen] or leaders
    return leaders[0]


def public_state(full: dict, chat: Any | None) -> dict:
    """The token-free view of the channel that /events streams: no pool contents, no engine internals."""
    steering = full.get("steering") or {}
    on_air = full.get("prompt_on_air") or None
    stored = steering.get("now_playing")
    if stored and (on_air is None or stored.get("text") == on_air):
        now_playing = {"text": stored["text"], "chosen_by": stored.get("chosen_by")}
    else:
        now_playing = {"text": on_air, "chosen_by": None} if on_air else None
    round_ = steering.get("round")
    if round_:
        options = [{k: o.get(k) for k in ("n", "text", "by", "votes", "vetoed")} for o in round_["options"]]
        round_ = {
            "id": round_["id"], "closed": round_["closed"], "closes_at": round_["closes_at"],
            "options": options, "total_votes": sum(o["votes"] or 0 for o in options),
            "winner": _winner({"options": options}, steering, chat.vote.min_votes if chat else 1)
            if round_["closed"] else None,
        }
    pool = steering.get("pool") or []
    commands = getattr(chat, "commands", None)
    return {
        "channel": full.get("channel"),
        "mode": steering.get("mode"),
        "paused": bool(steering.get("paused")),
        "now_playing": now_playing,
        "round": round_,
        "queue": [{"text": q["text"], "chosen_by": q.get("chosen_by")} for q in steering.get("queue", ())],
        "pool_size": len(pool),
        "pool_rev": hashlib.sha1(",".join(str(p.get("id")) for p in pool).encode()).hexdigest()[:10],
        "vote_command": f"{commands.prefix}{commands.vote[0]}" if commands else "!vote",
    }


class StateFeed:
    """One reader of the steering state for every /events client: polls, and publishes on change.

    Clients never queue: each waits for the shared `changed` event and sends the newest
    payload, so a slow client skips states instead of growing a backlog. The poller runs
    only while someone listens.
    """

    def __init__(self, read: Callable[[], Awaitable[dict]], interval: float = SSE_POLL_S):
        self._read = read
        self.interval = interval
        self.version = 0
        self.payload: str | None = None  # JSON of the newest state, without server_time
        self.changed = asyncio.Event()
        self.clients = 0
        self.by_address: dict[str, int] = {}
        self.closed = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._failing = False

    @contextlib.contextmanager
    def subscription(self, address: str = "?") -> Iterator[None]:
        """Count a listener (per client address too) for the duration; the first one starts the poller."""
        self.clients += 1
        self.by_address[address] = self.by_address.get(address, 0) + 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="sse-state-poll")
        try:
            yield
        finally:
            self.clients -= 1
            left = self.by_address.pop(address) - 1
            if left:
                self.by_address[address] = left

    def nudge(self) -> None:
        """Something was just changed through the API: read again soon, not at the next tick."""
        if self._task is None:
            return
        loop = asyncio.get_running_loop()
        for delay in (0.02, 0.1):  # the chat line is handled a moment after the API answered
            loop.call_later(delay, self._wake.set)

    def message(self) -> bytes:
        """The newest state as one SSE event, stamped with the server's clock for countdowns."""
        assert self.payload is not None
        data = f'{self.payload[:-1]}, "server_time": {time.time():.3f}}}'
        return f"event: state\nid: {self.version}\ndata: {data}\n\n".encode()

    def _publish(self, payload: str) -> None:
        self.version += 1
        self.payload = payload
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    async def _poll(self) -> None:
        while self.clients > 0 and not self.closed:
            try:
                payload = json.dumps(await self._read(), sort_keys=True, default=str)
            except Exception as exc:  # the store is down: keep the last state, say so once
                if not self._failing:
                    log.warning("event stream cannot read the state (%s: %s); retrying",
                                type(exc).__name__, exc)
                self._failing = True
            else:
                if self._failing:
                    log.info("event stream reads the state again")
                self._failing = False
                if payload != self.payload:
                    self._publish(payload)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    async def close(self) -> None:
        """End every stream (server shutdown)."""
        self.closed = True
        self.changed.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Api:
    """The route handlers, over what the service passes in (`app[API]`)."""

    def __init__(self, *, metrics: Metrics, health: Callable[[], tuple[bool, dict[str, Any]]],
                 state: Callable[[], Awaitable[dict[str, Any]]], steering: SteeringRuntime,
                 routes: Sequence[Route], operations: Operations | None = None,
                 events_per_client: int = SSE_MAX_PER_CLIENT):
        self._ops = operations
        self.events_per_client = events_per_client
        self._metrics = metrics
        self._health = health
        self._state = state
        self._steering = steering
        self._chat = getattr(steering.steering, "settings", None)  # vote rules and command names
        self.feed = StateFeed(self._public_state)
        self._document = json.dumps(document(tuple(routes)), indent=1).encode()

    async def _public_state(self) -> dict:
        return public_state(await self._state(), self._chat)

    # --- pages --------------------------------------------------------------------------------
    @staticmethod
    def _page(name: str, frame: bool) -> web.FileResponse:
        headers = {"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_CSP
                   + ("" if frame else "; frame-ancestors 'none'")}
        return web.FileResponse(STATIC_DIR / name, headers=headers)

    async def page_panel(self, _: web.Request) -> web.StreamResponse:
        return self._page("index.html", frame=False)

    async def page_overlay_poll(self, _: web.Request) -> web.StreamResponse:
        return self._page("overlay-poll.html", frame=True)

    async def page_overlay_now(self, _: web.Request) -> web.StreamResponse:
        return self._page("overlay-now.html", frame=True)

    # --- read-only ----------------------------------------------------------------------------
    async def healthz(self, _: web.Request) -> web.Response:
        ok, parts = self._health()
        status = ("degraded" if parts.get("degraded") else "ok") if ok else "failing"
        return web.json_response({"status": status, "time": time.time(), **parts},
                                 status=200 if ok else 503, dumps=_dumps)

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), content_type="text/plain", charset="utf-8")

    async def openapi(self, _: web.Request) -> web.Response:
        return web.Response(body=self._document, content_type="application/json")

    async def events(self, request: web.Request) -> web.StreamResponse:
        feed = self.feed
        address = request.remote or "?"
        if feed.by_address.get(address, 0) >= self.events_per_client:
            # One client must not fill the shared cap that the panel and every overlay depend on.
            self._metrics.http_refused.labels("events_per_client").inc()
            reason = f"too many event streams from this address (at most {self.events_per_client})"
            return _json_error(429, reason, {"Retry-After": "5"})
        if feed.clients >= SSE_MAX_CLIENTS:
            return _json_error(503, "too many event streams open", {"Retry-After": "5"})
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no"})
        await response.prepare(request)
        with feed.subscription(address):
            try:
                await response.write(b"retry: 2000\n\n")
                sent = 0
                quiet_since = time.monotonic()
                while not feed.closed:
                    changed = feed.changed  # taken before reading the version: no change is missed
                    if feed.version != sent and feed.payload is not None:
                        sent = feed.version
                        await response.write(feed.message())
                        quiet_since = time.monotonic()
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), 1.0)
                    if request.transport is None or request.transport.is_closing():
                        break  # the client left
                    if time.monotonic() - quiet_since >= SSE_HEARTBEAT_S:
                        await response.write(b": heartbeat\n\n")
                        quiet_since = time.monotonic()
            except ConnectionError:
                pass  # the client left mid-write
        return response

    # --- the control API ----------------------------------------------------------------------
    async def state(self, _: web.Request) -> web.Response:
        return web.json_response(await self._state(), dumps=_dumps)

    async def prompt(self, request: web.Request) -> web.Response:
        prompt = await _string_field(request, "prompt")
        if isinstance(prompt, web.Response):
            return prompt
        entry = await self._steering.steering.enqueue_direct(prompt, "panel")
        self.feed.nudge()
        return web.json_response({"accepted": True, "queued": entry.entry_id, "prompt": prompt}, status=202)

    async def chat(self, request: web.Request) -> web.Response:
        text = await _string_field(request, "text")
        if isinstance(text, web.Response):
            return text
        login = request.query.get("login", "panel")
        if not LOGIN.fullmatch(login):
            return _json_error(400, "'login' must be 1 to 25 letters, digits or underscores")
        role = Role.MODERATOR if request.query.get("role") == "moderator" else Role.VIEWER
        local = self._steering.local
        event = local.event(login, text, roles=frozenset({role}))
        # Handled before answering: 202 means the store holds whatever the line added (a store
        # that cannot take it raises StoreUnavailable: 503 with Retry-After, see json_errors).
        await self._steering.steering.handle(event)
        self.feed.nudge()
        return web.json_response({"accepted": True, "reply": local.reply_to(event)}, status=202)

    # --- operations -------------------------------------------------------------------------------
    def _operations(self) -> Operations:
        if self._ops is None:
            raise web.HTTPServiceUnavailable(reason="operations are not available in this server")
        return self._ops

    async def schedule(self, _: web.Request) -> web.Response:
        return web.json_response(self._operations().schedule_status(), dumps=_dumps)

    async def schedule_reload(self, _: web.Request) -> web.Response:
        ops = self._operations()
        ok, problems = await ops.reload_schedule()
        if ok:
            self.feed.nudge()
            return web.json_response({"reloaded": True, "schedule": ops.schedule_status()}, dumps=_dumps)
        status = 409 if ops.config_path is None else 422
        return web.json_response({"reloaded": False, "error": "; ".join(problems), "problems": problems},
                                 status=status)

    async def reanchor(self, _: web.Request) -> web.Response:
        self._operations().reanchor()
        return self._done("reanchor")

    def _done(self, action: str, **extra: Any) -> web.Response:
        self.feed.nudge()
        return web.json_response({"accepted": True, "action": action, **extra})

    async def skip(self, _: web.Request) -> web.Response:
        self._steering.steering.skip_requested = True
        return self._done("skip")

    async def pause(self, _: web.Request) -> web.Response:
        self._steering.steering.paused = True
        return self._done("pause", paused=True)

    async def resume(self, _: web.Request) -> web.Response:
        self._steering.steering.paused = False
        return self._done("resume", paused=False)

    async def veto(self, request: web.Request) -> web.Response:
        body = await _json_body(request, optional=True)
        if isinstance(body, web.Response):
            return body
        option = body.get("option")
        runtime = self._steering.steering
        if option is None:
            dropped = await runtime.veto_next()
            if dropped is None:
                return _json_error(409, "nothing to veto: the queue is empty")
            return self._done("veto", vetoed={"prompt": dropped.text, "chosen_by": dropped.chosen_by})
        if not isinstance(option, int) or isinstance(option, bool) or option < 1:
            return _json_error(400, "'option' must be a positive integer (leave it out to veto the queue)")
        current = await runtime.store.current_round()
        if current is None or current.closed:
            return _json_error(409, "no vote round is open")
        if option > len(current.options):
            return _json_error(400, f"the round has {len(current.options)} options; no option {option}")
        await runtime.veto_option(option)
        return self._done("veto", vetoed={"option": option})

    async def approve(self, request: web.Request) -> web.Response:
        suggestion = await _string_field(request, "id")
        if isinstance(suggestion, web.Response):
            return suggestion
        entry = await self._steering.steering.approve(suggestion, by="panel")
        if entry is None:
            return _json_error(404, f"no suggestion {suggestion!r} in the pool")
        return self._done("approve", queued=entry.entry_id)

    async def ban(self, request: web.Request) -> web.Response:
        text = await _string_field(request, "text")
        if isinstance(text, web.Response):
            return text
        await self._steering.steering.ban(text)
        return self._done("ban")


API = web.AppKey("api", Api)


async def _json_body(request: web.Request, optional: bool = False) -> dict | web.Response:
    """The body as a JSON object, or the 400 answer saying what is wrong (413 is raised by aiohttp)."""
    raw = await request.read()
    if not raw.strip() and optional:
        return {}
    try:
        body = json.loads(raw)
    except RecursionError:
        return _json_error(400, "body is nested too deeply")
    except (ValueError, UnicodeDecodeError) as exc:  # ValueError: bad JSON, or an integer of 4,300+ digits
        return _json_error(400, f"body is not valid JSON ({str(exc)[:200]})")
    if not isinstance(body, dict):
        return _json_error(400, "body must be a JSON object")
    return body


async def _string_field(request: web.Request, name: str) -> str | web.Response:
    """The non-empty string field `name` of a JSON body, or the 4xx answer saying what is wrong."""
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        return _json_error(400, f"'{name}' must be a non-empty string")
    if len(value) > MAX_PROMPT_CHARS:
        return _json_error(413, f"'{name}' longer than {MAX_PROMPT_CHARS} characters")
    if any("\ud800" <= c <= "\udfff" for c in value):
        return _json_error(400, f"'{name}' is not valid Unicode (a lone surrogate)")
    if any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in value):
        return _json_error(400, f"'{name}' contains control characters")
    # What chat moderation does to every line: bidi overrides, zero-width and line separators go.
    value = clean_text(value)
    if not value:
        return _json_error(400, f"'{name}' is empty once invisible characters are removed")
    return value


def _error_reason(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404 and request.path.startswith("/api/"):
        action = request.path.removeprefix("/api/")
        single = action and "/" not in action
        what = f"unknown action {action!r}" if single else f"unknown path {request.path}"
        return f"{what}; the API is described at /api/openapi.json"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} not allowed on {request.path}; allowed: {allowed}"
    if exc.status == 413:
        return f"body larger than {MAX_BODY_BYTES} bytes"
    return exc.reason


def make_app(
    *,
    metrics: Metrics,
    health: Callable[[], tuple[bool, dict[str, Any]]],
    state: Callable[[], Awaitable[dict[str, Any]]],
    steering: SteeringRuntime,
    api_token: str,
    hls_dir: Path | None,
    cors_origins: Sequence[str] = (),
    rate_per_s: float = RATE_PER_S,
    rate_burst: int = RATE_BURST,
    operations: Operations | None = None,
    events_per_client: int = SSE_MAX_PER_CLIENT,
) -> web.Application:
    """Build the aiohttp application; the service passes in what each route reads or does.

    `rate_per_s` <= 0 turns the rate limit off.
    """
    if not api_token.strip():
        raise ValueError("an empty API token would let every request through")
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    api = Api(metrics=metrics, health=health, state=state, steering=steering, routes=ROUTES,
              operations=operations, events_per_client=events_per_client)
    app[API] = api
    origins = {o.lower() for o in cors_origins}
    limiter = RateLimiter(rate_per_s, rate_burst) if rate_per_s > 0 else None

    def allowed_origin(request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        if origin and ("*" in origins or origin.lower() in origins):
            return origin
        return None

    def authorised(request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_token.encode())

    @web.middleware
    async def cors(request: web.Request, handler):
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            origin = allowed_origin(request)
            if origin is None:
                return _json_error(403, "cross-origin requests are not allowed (server.cors_origins)")
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            })
        return await handler(request)

    @web.middleware
    async def rate_limit(request: web.Request, handler):
        if limiter is not None:
            wait = limiter.take(request.remote or "?")
            if wait > 0:
                return _json_error(429, "too many requests from this address; slow down",
                                   {"Retry-After": str(max(1, math.ceil(wait)))})
        return await handler(request)

    @web.middleware
    async def json_errors(request: web.Request, handler):
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return _json_error(413, f"body larger than {MAX_BODY_BYTES} bytes")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            keep = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
            return _json_error(exc.status, _error_reason(request, exc), keep)
        except StoreUnavailable as exc:
            # Nothing was accepted: the client may send it again once the store is back.
            log.warning("%s %s refused, store unavailable: %s", request.method, request.path, exc)
            return _json_error(503, "the store is unavailable; nothing was kept, try again",
                               {"Retry-After": str(STORE_RETRY_AFTER_S)})

    @web.middleware
    async def require_token(request: web.Request, handler):
        public = request.path in PUBLIC_API
        if request.path.startswith("/api/") and not public and not authorised(request):
            return _json_error(401, "missing or wrong bearer token (PROMPTCAST_API_TOKEN)",
                               {"WWW-Authenticate": 'Bearer realm="promptcast"'})
        return await handler(request)

    async def response_headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        origin = allowed_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Retry-After, Location, Link"
            response.headers.add("Vary", "Origin")

    async def close_feed(_: web.Application) -> None:
        await api.feed.close()  # long-lived /events answers end here, not at the shutdown timeout

    app.middlewares.extend([cors, rate_limit, json_errors, require_token])
    app.on_response_prepare.append(response_headers)
    app.on_shutdown.append(close_feed)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, getattr(api, route.handler), name=route.operation_id)
    app.router.add_static("/static/", STATIC_DIR, show_index=False)
    if hls_dir is not None:
        hls_dir.mkdir(parents=True, exist_ok=True)
        app.router.add_static("/hls/", hls_dir, show_index=False)
    # Route groups outside this table register here (WHEP/WHIP: broadcaster/webrtc.py).
    return app
