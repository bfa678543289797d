"""The chat sources' status as an operator sees it: `status()`, the promptcast_chat_source_* metrics, and
the twitchio internals the Twitch source leans on (a newer twitchio that drops one fails here, by name)."""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from broadcaster.source_metrics import SourceCollector
from chat.sources import LocalSource
from tests.fake_twitch import FakeTwitch
from tests.test_twitch_source import connected, make_source, running


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwitch]:
    async with FakeTwitch() as server:
        yield server


def scrape(*sources) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(SourceCollector(sources))
    text = generate_latest(registry).decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.MULTILINE)}


async def test_a_connected_source_reports_its_session_subscriptions_and_last_message(
        fake: FakeTwitch) -> None:
    source = make_source(fake)
    async with connected(fake, source) as chat:
        await fake.send_chat("alice", "hello")
        await chat.wait_count(1)
        status = source.status()
    (conn,) = fake.connections
    assert status["state"] == "connected" and status["sessions"] == [conn.session_id]
    assert status["subscriptions"] == ["channel.chat.message"]
    assert 0 <= status["last_message_age_s"] < 5


async def test_a_revoked_token_shows_as_such_in_status_and_metrics(fake: FakeTwitch) -> None:
    source = make_source(fake)
    local = LocalSource()
    async with connected(fake, source), running(local):
        await fake.revoke("channel.chat.message", "authorization_revoked")
        await fake.wait_for(lambda: source.status()["state"] == "token_revoked", what="the state")
        metrics = scrape(source, local)
    assert metrics['promptcast_chat_source_connected{kind="twitch",source="twitch"}'] == 0
    assert metrics['promptcast_chat_source_connected{kind="local",source="local"}'] == 1
    revoked = ('promptcast_chat_source_revoked{reason="authorization_revoked",source="twitch",'
               'subscription="channel.chat.message"}')
    assert metrics[revoked] == 1
    assert metrics['promptcast_chat_source_reply_limit{kind="twitch",source="twitch"}'] == 20


def test_a_source_whose_status_fails_does_not_break_the_scrape() -> None:
    class Broken(LocalSource):
        def status(self):
            raise RuntimeError("no status today")

    metrics = scrape(Broken(), LocalSource())
    assert metrics['promptcast_chat_source_messages_total{kind="local",source="local"}'] == 0


async def test_status_before_run_says_stopped(fake: FakeTwitch) -> None:
    source = make_source(fake)
    assert source.status()["state"] == "stopped"
    async with running(source):
        await asyncio.sleep(0)
        assert source.status()["state"] in ("connecting", "connected")


# twitchio internals chat/sources/twitch.py relies on: name, and what it must still be
PRIVATE_HOOKS = {
    "twitchio.eventsub.websockets.Websocket._process_notification": "async method (data)",
    "twitchio.eventsub.websockets.Websocket._process_revocation": "async method (data)",
    "twitchio.eventsub.websockets.Websocket._reconnect": "async method (url)",
    "twitchio.eventsub.websockets.Websocket._socket": "slot (the aiohttp websocket)",
    "twitchio.eventsub.websockets.Websocket._subscriptions": "slot (moved along on session_reconnect)",
    "twitchio.eventsub.websockets.Websocket._last_keepalive": "slot (the keepalive watchdog's clock)",
    "twitchio.eventsub.websockets.Websocket._closed": "slot",
    "twitchio.eventsub.websockets.Websocket._closing": "slot",
    "twitchio.eventsub.websockets.Websocket._token_for": "slot",
    "twitchio.client.Client._websockets": "attribute (token user id -> session id -> socket)",
}


@pytest.mark.parametrize("hook", sorted(PRIVATE_HOOKS))
def test_the_twitchio_internals_the_source_relies_on_are_there(hook: str) -> None:
    import twitchio.client
    import twitchio.eventsub.websockets

    module_name, cls_name, attr = hook.rsplit(".", 2)
    cls = getattr({"twitchio.client": twitchio.client,
                   "twitchio.eventsub.websockets": twitchio.eventsub.websockets}[module_name], cls_name)
    what = PRIVATE_HOOKS[hook]
    found = attr in getattr(cls, "__slots__", ()) or hasattr(cls, attr) or (
        attr in inspect.getsource(cls.__init__))
    assert found, (f"twitchio {version('twitchio')} has no {hook} ({what}): chat/sources/twitch.py needs it; "
                   f"pin twitchio back (pyproject.toml) or adapt the source")
    if what.startswith("async method"):
        member = getattr(cls, attr)
        assert inspect.iscoroutinefunction(member), f"{hook} is no longer an async method"
        wanted = what.split("(")[1].rstrip(")")
        assert list(inspect.signature(member).parameters)[1] == wanted, f"{hook}: its argument changed"


def test_twitchio_is_the_tested_minor_version() -> None:
    from packaging.requirements import Requirement

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (line,) = re.findall(r'"(twitchio[^"]*)"', text)
    assert Requirement(line).specifier.contains(version("twitchio")), (line, version("twitchio"))
    assert "<" in line, "twitchio needs an upper bound: its internals are used (chat/sources/twitch.py)"
