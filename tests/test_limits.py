"""The edges a single client or operator could break: tokens, YAML size, connections, per-client caps,
contained failures (pacer sinks, background tasks), and what /healthz concludes."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from aiortc import RTCPeerConnection

from broadcaster.api_token import TokenError, api_token
from broadcaster.connections import ConnectionCap, fd_status
from broadcaster.encoder import StreamEncoder
from broadcaster.health import GRACE_S, HealthVerdict
from broadcaster.http import make_app
from broadcaster.metrics import Metrics
from broadcaster.pacer import Pacer
from broadcaster.settings import ConfigError, EncoderSettings, ServerSettings, Settings, parse_settings
from broadcaster.switches import SwitchTracker
from broadcaster.tasks import FailureLog, background, keep_running
from broadcaster.webrtc import WhepHub
from chat.memory_store import MemoryStore
from chat.settings import ChatSettings
from chat.sources.local import LocalSource
from chat.steering import Steering
from engine.ring import FrameRing

TOKEN = "limits-token-0123456789"


# --- the control API token ------------------------------------------------------------------------

def _settings(tmp_path) -> Settings:
    return Settings.model_validate({"server": {"token_file": str(tmp_path / "out" / "api-token")}})


@pytest.mark.parametrize("content", ["", "   \n", "short-token\n"])
def test_an_empty_or_short_token_file_refuses_the_start(tmp_path, monkeypatch, content):
    monkeypatch.delenv("PROMPTCAST_API_TOKEN", raising=False)
    settings = _settings(tmp_path)
    settings.server.token_file.parent.mkdir(parents=True)
    settings.server.token_file.write_text(content)
    with pytest.raises(TokenError, match="at least 16"):
        api_token(settings)


def test_a_blank_token_in_the_environment_refuses_the_start(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTCAST_API_TOKEN", " ")
    with pytest.raises(TokenError, match="PROMPTCAST_API_TOKEN"):
        api_token(_settings(tmp_path))


def test_a_generated_token_file_is_private_and_read_back_the_same(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMPTCAST_API_TOKEN", raising=False)
    settings = _settings(tmp_path)
    token = api_token(settings)
    path = settings.server.token_file
    assert len(token) >= 16 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["api-token"]  # no temporary file left
    assert api_token(settings) == token


def test_the_cli_refuses_an_empty_token_file_with_exit_2_and_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "api-token").write_text("")
    (tmp_path / "c.yaml").write_text("channel: t\nengine: {backend: preview, width: 64, height: 48}\n"
                                     "outputs: []\nserver: {port: 0}\n")
    env = {k: v for k, v in os.environ.items() if k != "PROMPTCAST_API_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "broadcaster", "run", "--config", "c.yaml"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("cannot start: the control API token")


# --- YAML ---------------------------------------------------------------------------------------

def _bomb(levels: int) -> str:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join([*lines, "channel: bomb", f"schedule: {{playlists: {{calm: {{prompts: *a{levels}}}}}}}"])


def test_an_alias_bomb_is_refused_at_once_with_its_location():
    started = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        parse_settings(_bomb(8))
    assert time.monotonic() - started < 1.0
    problem = refused.value.problems[0]
    assert "YAML aliases" in problem.message and problem.line is not None and problem.location


def test_a_self_referencing_alias_and_a_huge_file_are_refused():
    with pytest.raises(ConfigError, match="refers to itself"):
        parse_settings("a: &a [*a]\nchannel: x\n")
    with pytest.raises(ConfigError, match="characters; at most"):
        parse_settings("channel: x\n" + "#" * 1_100_000)


def test_ordinary_aliases_still_work():
    text = "x: &p [a calm lake at dawn]\nchannel: al\nschedule: {playlists: {calm: {prompts: *p}}}\n"
    with pytest.raises(ConfigError) as refused:  # `x` is no section: that is the only problem
        parse_settings(text)
    assert [p.location for p in refused.value.problems] == ["x"]


# --- HTTP: connections, idle clients, per-client caps -----------------------------------------------

class Runtime:
    def __init__(self) -> None:
        self.local = LocalSource()
        self.steering = Steering(ChatSettings(), MemoryStore())


async def _server(prepare=None, **runner_kwargs) -> tuple[TestServer, Metrics]:
    metrics = Metrics()
    runtime = Runtime()

    async def state() -> dict:
        return {"channel": "t", "steering": await runtime.steering.state()}

    app = make_app(metrics=metrics, health=lambda: (True, {}), state=state, steering=runtime, api_token=TOKEN,
                   hls_dir=None, rate_per_s=0, events_per_client=3)
    if prepare is not None:
        prepare(app)  # e.g. WHEP registers its routes, as the service does, before serving
    server = TestServer(app)
    await server.start_server(**runner_kwargs)  # AppRunner arguments, as the service passes them
    return server, metrics


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()


async def test_connections_over_the_cap_get_a_503_and_are_closed():
    server, metrics = await _server()
    ConnectionCap(server.runner.server, 8, metrics)
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
    try:
        answer = await _raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
        for s in idle:
            s.close()
        await asyncio.sleep(0.3)
        answer = await _raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        await server.close()


async def test_a_client_that_never_finishes_its_headers_is_closed():
    server, _ = await _server(keepalive_timeout=1.0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: ")
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
        assert time.monotonic() - started < 5
        writer.close()
    finally:
        await server.close()


async def test_one_address_cannot_take_every_event_stream():
    server, _ = await _server()
    try:
        async with ClientSession() as http:
            streams = [await http.get(server.make_url("/events")) for _ in range(3)]
            refused = await http.get(server.make_url("/events"))
            assert refused.status == 429 and "event streams" in (await refused.json())["error"]
            assert all(s.status == 200 for s in streams)
            for s in streams:
                s.close()
    finally:
        await server.close()


async def _offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def test_offers_that_never_connect_hold_at_most_two_slots_per_address():
    encoder = StreamEncoder(EncoderSettings(preset="ultrafast", codec="libx264", threads=1), 64, 48, 16)
    metrics = Metrics()
    hub = WhepHub(ServerSettings(whep_max_viewers=10, whep_pending_per_client=2), encoder, metrics)
    server, _ = await _server(prepare=hub.add_routes)
    peers = []
    try:
        async with ClientSession() as http:
            statuses = []
            for _ in range(3):
                pc, sdp = await _offer()
                peers.append(pc)
                async with http.post(server.make_url("/whep"), data=sdp,
                                     headers={"Content-Type": "application/sdp"}) as answer:
                    statuses.append(answer.status)
                    body = await answer.read()
            assert statuses == [201, 201, 429], body
            async with http.post(server.make_url("/whep"), data=b"\xff\xfe binary",
                                 headers={"Content-Type": "application/sdp"}) as binary:
                assert binary.status in (400, 429)
    finally:
        for pc in peers:
            await pc.close()
        await hub.close()
        await server.close()
        encoder.close()


# --- containment ----------------------------------------------------------------------------------

def test_a_failing_pacer_sink_costs_nothing_to_the_clock_or_the_other_sinks():
    ring = FrameRing.create(64, 48, 4)
    encoder = StreamEncoder(EncoderSettings(preset="ultrafast", codec="libx264", threads=1), 64, 48, 16)
    metrics = Metrics()
    received = []

    def broken(packet) -> None:
        raise OSError(24, "Too many open files")

    try:
        pacer = Pacer(ring, encoder, [broken, received.append], metrics, SwitchTracker(metrics), 16)
        pacer.frame_sinks.append(lambda frame: 1 / 0)
        for index in range(20):
            pacer.step(index)
        assert pacer.frames_out == 20 and len(received) >= 20
        failures = metrics.task_failures.labels("sink-broken")._value.get()
        assert failures >= 20  # every packet counted; the traceback is logged once
        assert metrics.task_failures.labels("sink-<lambda>")._value.get() == 20
    finally:
        encoder.close()
        ring.close()


async def test_keep_running_retries_a_failing_part_and_background_tasks_are_reported():
    from broadcaster.backoff import Backoff

    metrics = Metrics()
    failures = FailureLog(metrics)
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise OSError(24, "Too many open files")

    await asyncio.wait_for(keep_running("output-x", flaky, failures, Backoff(0.01, 0.02)), 5)
    assert calls == 3 and metrics.task_failures.labels("output-x")._value.get() == 2

    async def broken() -> None:
        raise RuntimeError("lost")

    task = background(broken(), "ack", failures)
    with pytest.raises(RuntimeError):
        await task
    await asyncio.sleep(0)
    assert metrics.task_failures.labels("ack")._value.get() == 1


def test_healthz_verdict_names_what_is_down_after_a_grace():
    now = [0.0]
    verdict = HealthVerdict(clock=lambda: now[0])
    parts = {"outputs": {"rtmp-0": {"connected": False, "last_error": "Connection refused"},
                         "rec": {"connected": False, "disk_full": True}},
             "chat": {"sources": [{"source": "twitch", "connected": True}],
                      "store": {"reachable": False, "last_error": "StoreUnavailable: down"}},
             "process": fd_status()}
    first = verdict.reasons(parts)
    assert any("disk full" in r for r in first) and any("store unreachable" in r for r in first)
    assert not any("rtmp-0" in r for r in first)  # reconnecting, not yet a fault
    now[0] += GRACE_S
    assert any(r.startswith("output rtmp-0 down: Connection refused") for r in verdict.reasons(parts))
    assert fd_status()["open_fds"] > 0 and fd_status()["fd_limit"] > 0


def test_accept_errors_at_the_fd_limit_are_one_line_per_interval():
    import logging

    from broadcaster.connections import AcceptErrorFilter

    now = [100.0]
    folded = AcceptErrorFilter(every_s=10, clock=lambda: now[0])
    records = []
    for _ in range(50):
        record = logging.LogRecord("asyncio", logging.ERROR, "", 0, AcceptErrorFilter.MESSAGE, (),
                                   (OSError, OSError(24, "Too many open files"), None))
        if folded.filter(record):
            records.append(record)
    now[0] += 10
    record = logging.LogRecord("asyncio", logging.ERROR, "", 0, AcceptErrorFilter.MESSAGE, (), None)
    assert folded.filter(record)
    assert len(records) == 1 and records[0].exc_info is None and records[0].levelname == "WARNING"
    assert "Too many open files" in records[0].getMessage()
    assert "49 more" in record.getMessage()
