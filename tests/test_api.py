"""The HTTP control API on `make_app` with real steering over the memory store: auth, errors, limits,
CORS, the OpenAPI document and the event stream."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broadcaster import http
from broadcaster.http import API, ROUTES, RateLimiter, make_app, public_state
from broadcaster.metrics import Metrics
from broadcaster.openapi import document
from broadcaster.settings import ServerSettings
from chat.memory_store import MemoryStore
from chat.settings import ChatSettings
from chat.sources.local import LocalSource
from chat.steering import Steering

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeRuntime:
    """What make_app uses of SteeringRuntime: the steering and the local chat source."""

    def __init__(self, chat: ChatSettings):
        self.steering = Steering(chat, MemoryStore())
        self.local = LocalSource()
        self.on_air = "a red fire in the night"


@pytest.fixture
async def make_client():
    clients: list[TestClient] = []

    async def make(chat: dict | None = None, **kwargs: Any) -> TestClient:
        runtime = FakeRuntime(ChatSettings.model_validate(chat or {}))

        async def state() -> dict:
            return {"channel": "test", "steering": await runtime.steering.state(),
                    "prompt_on_air": runtime.on_air, "engine": {"block": time.monotonic()}}

        def health() -> tuple[bool, dict]:
            return True, {"channel": "test", "pacer": {}, "engine": {"backend": "fake"}, "outputs": {}}

        app = make_app(metrics=Metrics(), health=health, state=state, steering=runtime, api_token=TOKEN,
                       hls_dir=None, **kwargs)
        client = TestClient(TestServer(app))
        await client.start_server()
        client.runtime = runtime  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


# --- auth ---------------------------------------------------------------------------------------

async def test_the_control_api_needs_the_bearer_token(make_client):
    client = await make_client()
    for method, path in (("GET", "/api/state"), ("POST", "/api/skip"), ("POST", "/api/prompt")):
        missing = await client.request(method, path)
        wrong = await client.request(method, path, headers={"Authorization": "Bearer nope"})
        assert (missing.status, wrong.status) == (401, 401), path
        assert "bearer token" in (await missing.json())["error"]
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    ok = await client.get("/api/state", headers=AUTH)
    assert ok.status == 200
    assert (await ok.json())["steering"]["mode"] == "vote"


async def test_reads_for_pages_and_overlays_need_no_token(make_client):
    client = await make_client()
    for path in ("/", "/overlay/poll", "/overlay/now", "/healthz", "/metrics", "/api/openapi.json",
                 "/static/panel.js", "/static/overlay.css"):
        response = await client.get(path)
        assert response.status == 200, path
    page = await client.get("/overlay/poll")
    assert "frame-ancestors" not in page.headers["Content-Security-Policy"]  # OBS and others may embed it
    panel = await client.get("/")
    assert "frame-ancestors 'none'" in panel.headers["Content-Security-Policy"]
    assert panel.headers["X-Content-Type-Options"] == "nosniff"
    script = await client.get("/static/panel.js")
    assert script.content_type in ("text/javascript", "application/javascript")


# --- errors with reasons ------------------------------------------------------------------------

async def test_malformed_json_is_a_400_with_the_reason(make_client):
    client = await make_client()
    for body, reason in ((b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
                         (b'{"prompt": 3}', "'prompt' must be a non-empty string"),
                         (b'{"prompt": "  "}', "'prompt' must be a non-empty string"),
                         (b'{"prompt": "a\\u0007bell"}', "control characters"),
                         (b"\xff\xfe", "not valid JSON")):
        response = await client.post("/api/prompt", data=body, headers=AUTH)
        assert response.status == 400, body
        assert reason in (await response.json())["error"], body


async def test_an_oversize_prompt_or_body_is_a_413_with_the_reason(make_client):
    client = await make_client()
    long_prompt = await client.post("/api/prompt", json={"prompt": "x" * 501}, headers=AUTH)
    assert long_prompt.status == 413
    assert "longer than 500" in (await long_prompt.json())["error"]
    huge = await client.post("/api/prompt", data=json.dumps({"prompt": "y" * 100_000}), headers=AUTH)
    assert huge.status == 413
    assert "larger than" in (await huge.json())["error"]

    async def chunks():  # no Content-Length: aiohttp finds out while reading
        for _ in range(20):
            yield b" " * 8192

    streamed = await client.post("/api/ban", data=chunks(), headers=AUTH)
    assert streamed.status == 413
    assert "error" in await streamed.json()


async def test_an_unknown_action_is_a_404_with_the_reason(make_client):
    client = await make_client()
    response = await client.post("/api/frobnicate", headers=AUTH)
    assert response.status == 404
    error = (await response.json())["error"]
    assert "unknown action 'frobnicate'" in error and "/api/openapi.json" in error
    missing = await client.post("/api/approve", json={"id": "nope"}, headers=AUTH)
    assert missing.status == 404
    assert "no suggestion 'nope'" in (await missing.json())["error"]


async def test_a_wrong_method_is_a_405_naming_the_allowed_one(make_client):
    client = await make_client()
    for method, path, allowed in (("GET", "/api/skip", "POST"), ("POST", "/api/state", "GET"),
                                  ("DELETE", "/api/prompt", "POST"), ("POST", "/healthz", "GET")):
        response = await client.request(method, path, headers=AUTH)
        assert response.status == 405, path
        assert response.headers["Allow"] == allowed
        assert f"allowed: {allowed}" in (await response.json())["error"]


# --- rate limit ---------------------------------------------------------------------------------

async def test_a_flood_from_one_address_gets_429_with_retry_after(make_client):
    client = await make_client()  # the defaults: 20 requests/s, bursts of 40
    statuses = []
    for _ in range(60):
        response = await client.get("/healthz")
        statuses.append(response.status)
        if response.status == 429:
            limited = response
            break
    assert statuses.count(200) >= 40
    assert statuses[-1] == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert "too many requests" in (await limited.json())["error"]
    await asyncio.sleep(0.2)  # tokens come back at 20 a second
    assert (await client.get("/healthz")).status == 200


def test_the_token_bucket_refills_and_keeps_addresses_apart():
    now = [0.0]
    limiter = RateLimiter(rate=2, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # another address has its own bucket
    now[0] += 0.5
    assert limiter.take("a") == 0.0
    many = RateLimiter(rate=1, burst=1, clock=lambda: now[0], max_clients=10)
    for i in range(50):
        many.take(f"10.0.0.{i}")
    assert len(many._buckets) <= 10


# --- CORS ---------------------------------------------------------------------------------------

async def test_cors_is_closed_by_default(make_client):
    client = await make_client()
    origin = {"Origin": "https://evil.example"}
    response = await client.get("/api/state", headers={**AUTH, **origin})
    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    preflight = await client.options("/api/prompt", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert preflight.status == 403
    assert "Access-Control-Allow-Origin" not in preflight.headers
    events = await client.get("/healthz", headers=origin)
    assert "Access-Control-Allow-Origin" not in events.headers


async def test_cors_opens_for_a_configured_origin_only(make_client):
    client = await make_client(cors_origins=["https://studio.example"])
    origin = {"Origin": "https://studio.example"}
    preflight = await client.options("/api/prompt", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://studio.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    response = await client.post("/api/pause", headers={**AUTH, **origin})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://studio.example"
    assert "Origin" in response.headers.getall("Vary")
    refused = await client.get("/api/state", headers={**origin})  # the browser must read the 401 too
    assert refused.status == 401
    assert refused.headers["Access-Control-Allow-Origin"] == "https://studio.example"
    other = await client.get("/api/state", headers={**AUTH, "Origin": "https://other.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_cors_origins_must_be_origins():
    assert ServerSettings(cors_origins=["https://a.example:8443", "http://[::1]:3000", "*"]).cors_origins
    for bad in ("https://a.example/path", "a.example", "ftp://a.example"):
        with pytest.raises(ValueError, match="not an origin"):
            ServerSettings(cors_origins=[bad])


# --- actions ------------------------------------------------------------------------------------

async def _open_round(client: TestClient, *texts: str) -> None:
    steering = client.runtime.steering
    for i, text in enumerate(texts):
        await steering.store.add_suggestion(text, text, f"u{i}", f"user{i}", "local", time.time() + i)
    await steering.tick()


async def test_veto_drops_the_next_queued_prompt_or_vetoes_an_option(make_client):
    client = await make_client(chat={"vote": {"options": 2, "min_suggestions": 2}})
    empty = await client.post("/api/veto", headers=AUTH)
    assert empty.status == 409
    assert "queue is empty" in (await empty.json())["error"]
    no_round = await client.post("/api/veto", json={"option": 1}, headers=AUTH)
    assert no_round.status == 409 and "no vote round" in (await no_round.json())["error"]

    await client.runtime.steering.enqueue_direct("first", "panel")
    await client.runtime.steering.enqueue_direct("second", "panel")
    dropped = await client.post("/api/veto", headers=AUTH)
    assert (await dropped.json())["vetoed"] == {"prompt": "first", "chosen_by": "panel"}
    state = await (await client.get("/api/state", headers=AUTH)).json()
    assert [q["text"] for q in state["steering"]["queue"]] == ["second"]

    await _open_round(client, "a fox", "a whale")
    for bad in ({"option": 0}, {"option": "1"}, {"option": True}, {"option": 3}):
        response = await client.post("/api/veto", json=bad, headers=AUTH)
        assert response.status == 400, bad
    vetoed = await client.post("/api/veto", json={"option": 2}, headers=AUTH)
    assert (await vetoed.json())["vetoed"] == {"option": 2}
    state = await (await client.get("/api/state", headers=AUTH)).json()
    assert [o["vetoed"] for o in state["steering"]["round"]["options"]] == [False, True]


async def test_pause_resume_skip_ban_and_approve(make_client):
    client = await make_client(chat={"mode": "manual"})
    steering = client.runtime.steering
    assert (await (await client.post("/api/pause", json={}, headers=AUTH)).json())["paused"] is True
    assert steering.paused
    await client.post("/api/resume", headers=AUTH)
    assert not steering.paused
    await client.post("/api/skip", headers=AUTH)
    assert steering.skip_requested
    await steering.store.add_suggestion("a quiet lake", "a quiet lake", "u1", "alice", "local", 1.0)
    await steering.store.add_suggestion("a loud city", "a loud city", "u2", "bob", "local", 2.0)
    pool = (await (await client.get("/api/state", headers=AUTH)).json())["steering"]["pool"]
    approved = await client.post("/api/approve", json={"id": pool[0]["id"]}, headers=AUTH)
    assert approved.status == 200
    assert (await (await client.post("/api/ban", json={"text": "loud"}, headers=AUTH)).json())["accepted"]
    state = (await (await client.get("/api/state", headers=AUTH)).json())["steering"]
    assert state["pool"] == []
    assert [q["text"] for q in state["queue"]] == ["a quiet lake"]
    assert await steering.store.banned()


async def test_chat_lines_are_handled_before_the_answer(make_client):
    client = await make_client()
    steering = client.runtime.steering
    response = await client.post("/api/chat?login=alice&role=moderator", json={"text": "!skip"}, headers=AUTH)
    assert response.status == 202
    assert steering.skip_requested  # a moderator command from alice, acted on before 202
    said = await client.post("/api/chat?login=bob", json={"text": "!prompt a quiet harbour"}, headers=AUTH)
    assert said.status == 202
    assert [(s.login, s.raw) for s in await steering.store.suggestions()] == [("bob", "a quiet harbour")]


# --- OpenAPI ------------------------------------------------------------------------------------

def _registered(app) -> set[tuple[str, str]]:
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path and route.method != "HEAD":
            found.add((route.method, path))
    return found


async def test_the_openapi_document_lists_exactly_the_registered_routes(make_client):
    client = await make_client()
    response = await client.get("/api/openapi.json")  # no token
    assert response.status == 200
    doc = await response.json()
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    registered = _registered(client.app)
    api = {r for r in registered if r[1].startswith("/api/")}
    assert api == {d for d in documented if d[1].startswith("/api/")}
    assert documented <= registered
    assert documented == {(r.method, r.path) for r in ROUTES}
    for method, path in documented:  # the document's word on the token is the server's behaviour
        needs_token = bool(doc["paths"][path][method.lower()]["security"])
        if path.startswith("/api/"):
            status = (await client.request(method, path)).status
            assert (status == 401) == needs_token, (method, path)


def _check_structure(doc: dict) -> None:
    """OpenAPI 3.1 rules that matter here: versions, unique operation ids, resolvable $refs,
    responses with descriptions and string codes, declared path parameters, known security."""
    assert re.fullmatch(r"3\.1\.\d+", doc["openapi"])
    assert doc["info"]["title"] and doc["info"]["version"]
    schemes = doc["components"]["securitySchemes"]
    ids = set()

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        assert ref.startswith("#/"), ref
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part]
    for path, operations in doc["paths"].items():
        assert path.startswith("/")
        declared = set(re.findall(r"{([^}]+)}", path))
        for method, op in operations.items():
            assert method in {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
            assert op["operationId"] not in ids
            ids.add(op["operationId"])
            assert op["responses"]
            for code, answer in op["responses"].items():
                assert re.fullmatch(r"[1-5](\d\d|XX)|default", code), code
                assert answer["description"]
            params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert params == declared, path
            for p in op.get("parameters", []):
                assert p["in"] in {"query", "header", "path", "cookie"} and "schema" in p
            for requirement in op["security"]:
                assert set(requirement) <= set(schemes)
            if "requestBody" in op:
                assert op["requestBody"]["content"]


def test_the_openapi_document_is_structurally_valid():
    doc = document(ROUTES)
    _check_structure(doc)
    json.dumps(doc)  # serialisable as is


def test_the_openapi_document_passes_the_reference_validator():
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(document(ROUTES))


# --- the event stream ---------------------------------------------------------------------------

async def _next_event(response) -> tuple[str, Any]:
    """The next event (name, data) or comment ('comment', text) from an SSE response."""
    lines = []
    while True:
        raw = await asyncio.wait_for(response.content.readline(), 5)
        if not raw:
            raise EOFError("the event stream ended")
        line = raw.decode().rstrip("\n")
        if line:
            lines.append(line)
            continue
        if not lines:
            continue
        if all(x.startswith(":") for x in lines):
            return "comment", lines[0][1:].strip()
        fields = dict(x.split(": ", 1) for x in lines if not x.startswith(":"))
        if "event" in fields:
            return fields["event"], json.loads(fields["data"])
        lines = []  # the retry: line


async def test_events_stream_the_state_on_change(make_client):
    client = await make_client(chat={"vote": {"options": 2, "min_suggestions": 2}})
    response = await client.get("/events")  # no token
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    name, first = await _next_event(response)
    assert name == "state"
    assert first["now_playing"] == {"text": "a red fire in the night", "chosen_by": None}
    assert first["paused"] is False and first["round"] is None
    assert "pool" not in first and "engine" not in first  # token-free: no pool contents, no internals

    await client.post("/api/pause", headers=AUTH)
    started = time.monotonic()
    name, paused = await _next_event(response)
    assert paused["paused"] is True
    assert time.monotonic() - started < 1.0

    await _open_round(client, "a fox in the snow", "a whale in the sea")
    _, opened = await _next_event(response)
    assert [o["text"] for o in opened["round"]["options"]] == ["a fox in the snow", "a whale in the sea"]
    assert opened["round"]["closes_at"] > opened["server_time"] - 1
    assert opened["vote_command"] == "!vote"
    response.close()


async def test_events_send_a_heartbeat_when_nothing_changes(make_client, monkeypatch):
    monkeypatch.setattr(http, "SSE_HEARTBEAT_S", 0.3)
    client = await make_client()
    response = await client.get("/events")
    assert (await _next_event(response))[0] == "state"
    assert await _next_event(response) == ("comment", "heartbeat")
    response.close()


async def test_many_event_clients_share_one_reader_and_leave_cleanly(make_client):
    client = await make_client(rate_per_s=0, events_per_client=100)  # 60 at once from one address
    feed = client.app[API].feed
    reads = 0
    original = feed._read

    async def counting() -> dict:
        nonlocal reads
        reads += 1
        return await original()

    feed._read = counting
    streams = [await client.get("/events") for _ in range(60)]
    firsts = await asyncio.gather(*(_next_event(s) for s in streams))
    assert all(name == "state" for name, _ in firsts)
    assert feed.clients == 60
    before = reads
    await asyncio.sleep(0.6)
    assert reads - before <= 5  # one poller at ~4 Hz, not one per client
    await client.post("/api/pause", headers=AUTH)
    updates = await asyncio.gather(*(_next_event(s) for s in streams))
    assert all(data["paused"] for _, data in updates)
    for stream in streams:
        stream.close()
    deadline = time.monotonic() + 5
    while feed.clients and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert feed.clients == 0
    await asyncio.sleep(0.5)
    assert feed._task is None or feed._task.done()  # nobody listens: nobody polls


async def test_shutdown_ends_open_event_streams_at_once(make_client):
    client = await make_client()
    response = await client.get("/events")
    await _next_event(response)
    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 3


def test_the_public_state_names_the_winner_of_a_closed_round():
    options = [{"n": 1, "text": "a fox", "by": "alice", "votes": 2, "vetoed": False},
               {"n": 2, "text": "a whale", "by": "bob", "votes": 3, "vetoed": True}]
    full = {"channel": "c", "prompt_on_air": "p",
            "steering": {"mode": "vote", "paused": False, "now_playing": None, "queue": [], "pool": [],
                         "round": {"id": "1", "closed": True, "closes_at": 5.0, "options": options}}}
    state = public_state(full, ChatSettings())
    assert state["round"]["winner"]["by"] == "alice"  # the vetoed option had more votes
    assert state["round"]["total_votes"] == 5
    assert state["now_playing"] == {"text": "p", "chosen_by": None}
    full["steering"]["round"]["closed"] = False
    assert public_state(full, ChatSettings())["round"]["winner"] is None
    options[0]["votes"] = 0
    full["steering"]["round"]["closed"] = True
    assert public_state(full, ChatSettings())["round"]["winner"] is None  # only vetoed votes
