"""Malformed requests against every route of the OpenAPI document (and WHEP): a JSON 4xx, never a 5xx.

The app is the real one (`make_app` + a `WhepHub` on a real encoder, steering over the memory
store, a `Service` for the operations routes), served on a real socket; hypothesis draws JSON
bodies, raw bytes, query strings, headers and SDP. Afterwards the service must still answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from aiohttp import ClientSession, ClientTimeout
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broadcaster.encoder import StreamEncoder
from broadcaster.http import ROUTES, make_app
from broadcaster.metrics import Metrics
from broadcaster.openapi import document
from broadcaster.service import Service
from broadcaster.settings import EncoderSettings, ServerSettings, Settings
from broadcaster.webrtc import WhepHub
from chat.memory_store import MemoryStore
from chat.settings import ChatSettings
from chat.sources.local import LocalSource
from chat.steering import Steering

TOKEN = "fuzz-token-0123456789abcdef"
PATHS = document(ROUTES)["paths"]
OPERATIONS = sorted((method.upper(), path) for path, item in PATHS.items() for method in item)
ALL = [*OPERATIONS, ("POST", "/whep"), ("PATCH", "/whep/{id}"), ("DELETE", "/whep/{id}")]


class Runtime:
    """What make_app reads of a SteeringRuntime: real steering on the memory store, the local source."""

    def __init__(self) -> None:
        self.local = LocalSource()
        self.steering = Steering(ChatSettings(), MemoryStore())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    config = tmp / "channel.yaml"
    config.write_text("channel: fuzz\noutputs: []\nschedule: {}\n")
    loop = asyncio.new_event_loop()
    runtime = Runtime()
    encoder = StreamEncoder(EncoderSettings(preset="ultrafast", codec="libx264", threads=1,
                                            video_bitrate_kbps=200), 64, 48, 16)
    metrics = Metrics()

    async def state() -> dict:
        return {"channel": "fuzz", "steering": await runtime.steering.state(), "prompt_on_air": None}

    def health() -> tuple[bool, dict]:
        return True, {"channel": "fuzz", "outputs": {}}

    async def start():
        app = make_app(metrics=metrics, health=health, state=state, steering=runtime, api_token=TOKEN,
                       hls_dir=None, rate_per_s=0, operations=Service(Settings(), metrics, str(config)))
        WhepHub(ServerSettings(), encoder, metrics).add_routes(app)
        server = TestServer(app)
        await server.start_server()
        return server, ClientSession(timeout=ClientTimeout(total=20))

    server, http = loop.run_until_complete(start())
    yield loop, server, http, runtime
    loop.run_until_complete(http.close())
    loop.run_until_complete(server.close())
    loop.close()
    encoder.close()


def _deep(depth: int) -> bytes:
    return b'{"text": ' + b"[" * depth + b"]" * depth + b"}"


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
FIELDS = st.sampled_from(["prompt", "text", "id", "option"])
FIELD_BODIES = st.builds(lambda k, v: {k: v}, FIELDS, JSON_VALUES)
BODIES = st.one_of(
    st.none(),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    FIELD_BODIES.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(1000, 6000).map(lambda n: b'{"option": ' + b"9" * n + b"}"),
    st.integers(1000, 30_000).map(_deep),
    st.sampled_from([b'{"prompt": "\\ud800"}', b'{"text": "\\u202e!prompt abc\\u2028"}',
                     b'{"text": "!prompt a\\u007fb"}', b"v=0\r\no=- 0 0 IN IP4 0\r\n", b"\xff\xfe\x00sdp"]),
)
QUERY = st.dictionaries(st.sampled_from(["login", "role", "theme", "position", "accent", "scale", "x"]),
                        st.text(max_size=30), max_size=3)
CONTENT_TYPES = st.sampled_from(["application/json", "application/sdp", "application/trickle-ice-sdpfrag",
                                 "text/plain", "application/x-www-form-urlencoded; charset=latin-1", ""])
AUTHS = st.sampled_from([f"Bearer {TOKEN}", "Bearer ", "Bearer", "", f"Basic {TOKEN}", "Bearer \u00e9"])


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(operation=st.sampled_from(ALL), body=BODIES, query=QUERY, content_type=CONTENT_TYPES, auth=AUTHS,
       session=st.text(max_size=20))
def test_no_malformed_request_gets_a_5xx(served, operation, body, query, content_type, auth, session):
    loop, server, http, _ = served
    method, path = operation
    path = path.replace("{id}", session.replace("/", "") or "x")
    headers = {k: v for k, v in (("Content-Type", content_type), ("Authorization", auth)) if v}

    async def send() -> tuple[int, str, bytes]:
        async with http.request(method, server.make_url(path), params=query, data=body,
                                headers=headers) as response:
            content = b"" if path == "/events" else await response.read()
            return response.status, response.content_type, content

    status, content_type_back, content = loop.run_until_complete(send())
    assert status < 500, (method, path, status, content[:300])
    if status >= 400 and path != "/events":
        assert content_type_back == "application/json", (method, path, status, content[:200])
        assert json.loads(content)["error"]


def test_the_service_still_works_after_the_fuzz(served):
    loop, server, http, runtime = served
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def check() -> None:
        async with http.get(server.make_url("/healthz")) as health:
            assert health.status == 200
        started = time.monotonic()
        async with http.post(server.make_url("/api/chat"), params={"login": "after_fuzz"}, headers=auth,
                             json={"text": "!prompt a lighthouse after the storm"}) as said:
            assert said.status == 202, await said.text()
        assert time.monotonic() - started < 5
        async with http.get(server.make_url("/api/state"), headers=auth) as state:
            assert state.status == 200
        pool = await runtime.steering.store.suggestions(limit=1000)
        assert any(s.login == "after_fuzz" for s in pool)

    loop.run_until_complete(check())
