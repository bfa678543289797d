"""Chat sources: the real twitchio 3 client against a local fake of Twitch, and the local panel source."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chat.events import ChatEvent, Role
from chat.settings import TwitchSourceSettings
from chat.sources import ChatSource, LocalSource, create_source
from chat.sources.twitch import (
    RecentIds,
    ReplyLimiter,
    TwitchSource,
    _Redactor,
    backoff_delay,
    roles_from_badges,
)
from tests.fake_twitch import (
    BOT_REFRESH,
    BOT_TOKEN,
    BROADCASTER_TOKEN,
    CLIENT_ID,
    CLIENT_SECRET,
    FakeTwitch,
)

SECRETS = (CLIENT_SECRET, BOT_TOKEN, BOT_REFRESH, BROADCASTER_TOKEN)


class Collector:
    """The `emit` a source is run with: keeps the events, lets a test wait for them."""

    def __init__(self) -> None:
        self.events: list[ChatEvent] = []
        self._changed = asyncio.Event()

    async def __call__(self, event: ChatEvent) -> None:
        self.events.append(event)
        self._changed.set()

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.events]

    async def wait_count(self, count: int, timeout: float = 3.0) -> list[ChatEvent]:
        async with asyncio.timeout(timeout):
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.events

    async def settle(self, seconds: float = 0.2) -> None:
        """Give anything still in flight the time to arrive (used before asserting that nothing more came)."""
        await asyncio.sleep(seconds)


def settings(fake: FakeTwitch | None = None, **overrides: Any) -> TwitchSourceSettings:
    """A channel's Twitch settings; with `fake`, pointed at it through the URL settings (as a user would)."""
    values: dict[str, Any] = {"channel": "streamer", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                              "user_token": BOT_TOKEN, "refresh_token": BOT_REFRESH}
    if fake is not None:
        values.update(eventsub_url=fake.eventsub_url, api_url=fake.api_url, auth_url=fake.auth_url)
    values.update(overrides)
    return TwitchSourceSettings(**values)


def make_source(fake: FakeTwitch, source_settings: TwitchSourceSettings | None = None,
                **kwargs: Any) -> TwitchSource:
    kwargs.setdefault("backoff_base", 0.05)
    kwargs.setdefault("backoff_max", 0.2)
    chosen = (source_settings or settings()).model_dump()
    chosen.update(eventsub_url=fake.eventsub_url, api_url=fake.api_url, auth_url=fake.auth_url)
    return TwitchSource(TwitchSourceSettings.model_validate(chosen), **kwargs)


@contextlib.asynccontextmanager
async def running(source: ChatSource) -> AsyncIterator[Collector]:
    collector = Collector()
    task = asyncio.create_task(source.run(collector))
    try:
        yield collector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def connected(fake: FakeTwitch, source: TwitchSource, *,
                    subscriptions: int = 1) -> AsyncIterator[Collector]:
    async with running(source) as collector:
        await fake.wait_subscribed("channel.chat.message")
        if subscriptions > 1:
            await fake.wait_subscribed("channel.channel_points_custom_reward_redemption.add")
        await fake.wait_for(lambda: source.status()["connected"], what="source connected")
        yield collector


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwitch]:
    async with FakeTwitch() as server:
        yield server


# ----------------------------------------------------------------------------------------------- chat


async def test_chat_messages_become_events_with_roles(fake: FakeTwitch) -> None:
    source = make_source(fake)
    async with connected(fake, source) as chat:
        await fake.send_chat("streamer", "from the broadcaster")
        await fake.send_chat("mod", "from a mod", badges=["moderator", "subscriber"])
        await fake.send_chat("lead", "from a lead mod", badges=["lead_moderator"])
        await fake.send_chat("vipper", "from a vip", badges=["vip"])
        await fake.send_chat("sub", "from a sub", badges=["subscriber"])
        await fake.send_chat("founder", "from a founder", badges=["founder"])
        await fake.send_chat("viewer", "from a viewer", badges=["premium"])
        events = await chat.wait_count(7)
    roles = {e.login: e.roles for e in events}
    assert roles == {
        "streamer": {Role.BROADCASTER},
        "mod": {Role.MODERATOR, Role.SUBSCRIBER},
        "lead": {Role.MODERATOR},
        "vipper": {Role.VIP},
        "sub": {Role.SUBSCRIBER},
        "founder": {Role.SUBSCRIBER},
        "viewer": {Role.VIEWER},
    }
    first = events[0]
    assert first.source == "twitch" and first.text == "from the broadcaster"
    assert first.user_id == fake.broadcaster_id and first.display_name == "Streamer"
    assert first.is_moderator and events[1].is_moderator and not events[3].is_moderator
    assert first.reward_id is None and first.redemption_id is None
    assert len({e.message_id for e in events}) == 7
    assert source.status()["messages"] == 7


async def test_events_start_in_arrival_order_and_run_side_by_side(fake: FakeTwitch) -> None:
    started: list[str] = []
    release = asyncio.Event()
    in_flight = peak = 0

    async def slow_emit(event: ChatEvent) -> None:  # a store round trip that takes a while
        nonlocal in_flight, peak
        started.append(event.text)
        in_flight += 1
        peak = max(peak, in_flight)
        await release.wait()
        in_flight -= 1

    source = make_source(fake, emit_concurrency=8)
    task = asyncio.create_task(source.run(slow_emit))
    try:
        await fake.wait_subscribed()
        await fake.wait_for(lambda: source.status()["connected"], what="connected")
        for i in range(20):
            await fake.send_chat("alice", f"m{i}")
        await fake.wait_for(lambda: len(started) == 8, what="8 events in flight")
        await asyncio.sleep(0.1)
        assert len(started) == 8  # no more than emit_concurrency at once
        release.set()
        await fake.wait_for(lambda: len(started) == 20, what="all events")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert started == [f"m{i}" for i in range(20)] and peak == 8


async def test_with_an_emit_that_takes_many_what_piled_up_goes_in_one_call(fake: FakeTwitch) -> None:
    from chat.sources.base import Delivery

    calls: list[list[str]] = []
    gate = asyncio.Event()

    async def many(events) -> None:
        calls.append([e.text for e in events])
        await gate.wait()  # the store is slow: chat piles up meanwhile

    async def one(event: ChatEvent) -> None:
        await many([event])

    source = make_source(fake)
    task = asyncio.create_task(source.run(Delivery(one, many)))
    try:
        await fake.wait_subscribed()
        await fake.wait_for(lambda: source.status()["connected"], what="connected")
        for i in range(4):  # the first calls take what is there, up to 4 calls wait at once
            await fake.send_chat("alice", f"early {i}")
            await fake.wait_for(lambda n=i: len(calls) == n + 1, what=f"call {i + 1}")
        for i in range(50):
            await fake.send_chat("bob", f"late {i}")
        await asyncio.sleep(0.3)  # the 50 arrive and wait in the source's queue behind the 4 calls
        gate.set()
        await fake.wait_for(lambda: sum(map(len, calls)) == 54, what="all delivered")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert calls[:4] == [["early 0"], ["early 1"], ["early 2"], ["early 3"]]
    assert source.status()["messages"] == 54
    assert [t for call in calls[4:] for t in call] == [f"late {i}" for i in range(50)]
    assert len(calls) < 10  # the 50 went in a few calls, not one each


async def test_duplicate_deliveries_are_dropped(fake: FakeTwitch) -> None:
    source = make_source(fake)
    async with connected(fake, source) as chat:
        first = await fake.send_chat("alice", "once")
        await fake.redeliver(first)  # the same notification again (same metadata.message_id)
        await fake.send_chat("alice", "once", message_id=first)  # the same chat message id
        await fake.send_chat("bob", "twice")
        await chat.wait_count(2)
        await chat.settle()
    assert chat.texts == ["once", "twice"]
    assert source.status()["duplicates_dropped"] == 2


@pytest.mark.parametrize("mode", ["own", "all"])
async def test_shared_chat_policy(fake: FakeTwitch, mode: str) -> None:
    source = make_source(fake, settings(shared_chat=mode))
    async with connected(fake, source) as chat:
        await fake.send_chat("alice", "own channel, no session")
        await fake.send_chat("bob", "typed in the other channel", source_broadcaster="otherchannel")
        await fake.send_chat("carol", "own channel, in a session", source_broadcaster="streamer")
        await fake.send_chat("dave", "last")
        await chat.wait_count(4 if mode == "all" else 3)
        await chat.settle()
    if mode == "own":
        assert chat.texts == ["own channel, no session", "own channel, in a session", "last"]
        assert source.status()["shared_chat_dropped"] == 1
    else:
        assert chat.texts == ["own channel, no session", "typed in the other channel",
                              "own channel, in a session", "last"]


async def test_text_is_passed_through_verbatim(fake: FakeTwitch) -> None:
    texts = [
        "héllo wörld — ✨🎨🐉 日本語のプロンプト",
        "مرحبا \u200f\u200e zero\u200bwidth a\u0301\u0301 <b>&amp;</b> \"quoted\" \\ back\\slash",
        "  leading and trailing spaces  ",
        "x" * 20_000,  # far over Twitch's 500: moderation (elsewhere) decides, the source does not cut
    ]
    source = make_source(fake)
    async with connected(fake, source) as chat:
        for text in texts:
            await fake.send_chat("alice", text)
        await chat.wait_count(len(texts))
    assert chat.texts == texts


async def test_cheermotes_are_left_out_so_a_cheer_can_carry_a_command(fake: FakeTwitch) -> None:
    source = make_source(fake)
    async with connected(fake, source) as chat:
        await fake.send_chat("alice", "Cheer100 !prompt a dragon over the sea")
        await fake.send_chat("bob", "a phoenix rising Cheer50")
        await fake.send_chat("carol", "biblethump1 Corgo25 party5")  # nothing but cheermotes
        await fake.send_chat("dave", "cheering for Cheer100x and Cheer 100")  # not cheermotes: words
        events = await chat.wait_count(4)
    # the rest is kept as it was, spaces included (commands and moderation trim them)
    assert [e.text for e in events] == [" !prompt a dragon over the sea", "a phoenix rising ", "  ",
                                        "cheering for Cheer100x and Cheer 100"]


async def test_mentions_come_from_twitchs_fragments(fake: FakeTwitch) -> None:
    fake.add_user("bob")
    source = make_source(fake)
    async with connected(fake, source) as chat:
        await fake.send_chat("alice", "!prompt @Bob as a knight, @nobody_here stays text")
        await fake.send_chat("alice", "mail me at a@b.example")
        events = await chat.wait_count(2)
    assert events[0].mentions == ("bob",)
    assert events[0].text == "!prompt @Bob as a knight, @nobody_here stays text"
    assert events[1].mentions == ()


async def test_a_cheer_with_a_prompt_becomes_a_suggestion_without_the_cheermote(fake: FakeTwitch) -> None:
    from chat.memory_store import MemoryStore
    from chat.settings import ChatSettings
    from chat.steering import Steering

    source = make_source(fake)
    steering = Steering(ChatSettings(mode="vote"), MemoryStore())
    async with running_into(source, steering):
        await fake.wait_subscribed()
        await fake.send_chat("alice", "Cheer100 !prompt a dragon Cheer100 over the sea")
        await fake.send_chat("bob", "!prompt @alice as a pirate")  # the default policy: refused
        await fake.wait_for(lambda: source.status()["messages"] == 2, what="both handled")
        await asyncio.sleep(0.1)
        pool = await steering.store.suggestions()
    assert [s.raw for s in pool] == ["a dragon over the sea"]


@contextlib.asynccontextmanager
async def running_into(source: TwitchSource, steering: Any) -> AsyncIterator[None]:
    task = asyncio.create_task(source.run(steering.handle))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ----------------------------------------------------------------------------------------------- connection


async def test_session_reconnect_loses_no_message(fake: FakeTwitch) -> None:
    source = make_source(fake)
    async with connected(fake, source) as chat:
        old = fake.open_connections()
        assert len(old) == 1
        # The new connection is welcomed 0.3 s late: meanwhile Twitch still sends on the old one.
        await fake.reconnect(welcome_delay=0.3)
        sent = []
        for i in range(6):
            sent.append(f"during {i}")
            await fake.send_chat("alice", sent[-1])
            await asyncio.sleep(0.06)
        await fake.wait_reconnected()
        for i in range(3):
            sent.append(f"after {i}")
            await fake.send_chat("alice", sent[-1])
        await chat.wait_count(len(sent))
        await chat.settle()
        assert chat.texts == sent  # none lost, none doubled, in order
        assert old[0].close_reason == "reconnected"
        assert old[0].notifications_sent >= 3  # the window mattered: these went to the old socket
        (new,) = fake.open_connections()
        assert "reconnect=" in new.path and new.subscriptions
        status = source.status()
        assert status["session_reconnects"] == 1 and status["reconnects"] == 0 and status["connected"]
        assert status["last_handover_ms"] < 500  # the old hand-over held the new socket for up to 3 s
        # later messages keep arriving on the new session
        await fake.send_chat("alice", "much later")
        await chat.wait_count(len(sent) + 1)


async def test_session_reconnect_does_not_wait_for_the_old_socket_to_close(fake: FakeTwitch) -> None:
    source = make_source(fake)
    async with connected(fake, source) as chat:
        (old,) = fake.open_connections()
        await fake.reconnect(close_old=False)  # a server slow to close the old connection
        await fake.wait_reconnected()
        await fake.wait_for(lambda: source.status()["session_reconnects"] == 1, what="the hand-over")
        sent = asyncio.get_running_loop().time()
        await fake.send_chat("alice", "on the new session")
        await chat.wait_count(1)
        stall = asyncio.get_running_loop().time() - sent
        assert old.open  # still open: nothing waited for it
    assert stall < 0.3  # the old hand-over held new notifications until the old socket closed, or 3 s


async def test_frames_on_the_old_socket_after_the_hand_over_are_all_handled(fake: FakeTwitch) -> None:
    own = settings(user_token=BROADCASTER_TOKEN, refresh_token="", reward_title="Prompt")
    source = make_source(fake, own)
    async with connected(fake, source, subscriptions=2) as chat:
        (old,) = fake.open_connections()
        chat_sub = next(s for s in old.subscriptions.values() if s["type"] == "channel.chat.message")
        await fake.reconnect(close_old=False)
        await fake.wait_reconnected()
        new = next(c for c in fake.open_connections() if c is not old)
        await fake.send_chat("alice", "late on the old one", via=old)  # sent before the switch, read after
        await fake.send_revocation(old, chat_sub, "user_removed")  # and a revocation right behind it
        await fake.send_chat("bob", "on the new one", via=new)
        await chat.wait_count(2)
        await fake.wait_for(lambda: source.status()["revoked"] != {}, what="the revocation")
        assert sorted(chat.texts) == ["late on the old one", "on the new one"]
        assert source.status()["revoked"] == {"channel.chat.message": "user_removed"}
        await fake.close_connection(old, "closed at last")
        await asyncio.sleep(0.1)
        await fake.redeem("carol", user_input="after the old one closed")
        await chat.wait_count(3)
        assert source.status()["reconnects"] == 0  # the old socket closing is no connection loss


async def test_a_moved_socket_that_the_server_never_closes_is_closed_by_the_source(fake: FakeTwitch) -> None:
    source = make_source(fake, retire_after=0.2)
    async with connected(fake, source) as chat:
        (old,) = fake.open_connections()
        await fake.reconnect(close_old=False)
        await fake.wait_reconnected()
        await fake.wait_for(lambda: not old.open, timeout=2, what="the old socket closed")
        await fake.send_chat("alice", "still reading")
        await chat.wait_count(1)
    assert old.close_reason == "client closed"


async def test_abrupt_drop_reconnects_by_itself(fake: FakeTwitch) -> None:
    source = make_source(fake)
    async with connected(fake, source) as chat:
        await fake.send_chat("alice", "before")
        await chat.wait_count(1)
        connections_before = len(fake.connections)
        await fake.drop(refuse_for=0.3)  # and refuse new connections for a while: the source must retry
        await fake.wait_for(lambda: source.status()["reconnects"] == 1, timeout=5, what="a reconnect")
        await fake.wait_subscribed()
        status = source.status()
        assert status["connected"]
        assert status["last_error"] is not None  # the refused attempts
        assert len(fake.connections) > connections_before
        await fake.send_chat("alice", "after")
        await chat.wait_count(2)
    assert chat.texts == ["before", "after"]


async def test_two_sources_in_one_process_each_reach_their_own_twitch() -> None:
    from twitchio.http import Route

    before = (Route.BASE, Route.ID_BASE)
    async with FakeTwitch() as one, FakeTwitch(channel="other") as two:
        first = TwitchSource(settings(one), backoff_base=0.05, backoff_max=0.2)
        second = TwitchSource(settings(two, channel="other"), backoff_base=0.05, backoff_max=0.2)
        async with connected(one, first) as chat_one, connected(two, second) as chat_two:
            assert before == (Route.BASE, Route.ID_BASE)  # nothing process-wide was changed
            await one.send_chat("alice", "to the first")
            await two.send_chat("bob", "to the second")
            await chat_one.wait_count(1)
            await chat_two.wait_count(1)
            await chat_one.settle()
    assert chat_one.texts == ["to the first"] and chat_two.texts == ["to the second"]
    assert ("GET", "/oauth2/validate") in one.requests and ("GET", "/oauth2/validate") in two.requests


@pytest.mark.parametrize(("field", "value", "message"), [
    ("eventsub_url", "https://eventsub.wss.twitch.tv/ws", "ws:// or wss://"),
    ("eventsub_url", "ws:///ws", "with a host"),
    ("api_url", "ftp://api.twitch.tv/helix", "http:// or https://"),
    ("auth_url", "https://id.twitch.tv/oauth2?client_secret=x", "query"),
    ("eventsub_api_url", "127.0.0.1:8080", "http:// or https://"),
])
def test_twitch_urls_are_checked_with_the_field_named(field: str, value: str, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        settings(**{field: value})
    (error,) = caught.value.errors()
    assert error["loc"] == (field,) and message in error["msg"]


def test_twitch_urls_default_to_twitch() -> None:
    chosen = settings()
    assert (chosen.eventsub_url, chosen.api_url, chosen.auth_url, chosen.eventsub_api_url) == (
        "wss://eventsub.wss.twitch.tv/ws", "https://api.twitch.tv/helix", "https://id.twitch.tv/oauth2", "")


def test_rebase_moves_twitchs_roots_and_the_subscriptions_endpoint() -> None:
    from chat.sources.twitch_http import Rebase

    rebase = Rebase("http://localhost:8080/mock/", "http://localhost:8080/auth", "http://127.0.0.1:8081")
    assert rebase("https://api.twitch.tv/helix/users?login=a") == "http://localhost:8080/mock/users?login=a"
    assert rebase("https://id.twitch.tv/oauth2/validate") == "http://localhost:8080/auth/validate"
    assert rebase("https://api.twitch.tv/helix/eventsub/subscriptions") == (
        "http://127.0.0.1:8081/eventsub/subscriptions")
    assert rebase("https://static-cdn.jtvnw.net/emote.png") == "https://static-cdn.jtvnw.net/emote.png"
    assert rebase("https://api.twitch.tv/helixx/evil") == "https://api.twitch.tv/helixx/evil"


def subscription_posts(fake: FakeTwitch) -> int:
    return fake.requests.count(("POST", "/helix/eventsub/subscriptions"))


@pytest.mark.parametrize("status", ["authorization_revoked", "user_removed", "version_removed",
                                    "moderator_removed", "a_reason_twitch_adds_later"])
async def test_a_revoked_chat_subscription_is_not_renewed_and_is_reported_once(
        fake: FakeTwitch, caplog: pytest.LogCaptureFixture, status: str) -> None:
    source = make_source(fake)
    async with connected(fake, source) as chat:
        posts = subscription_posts(fake)
        await fake.revoke("channel.chat.message", status)
        await fake.wait_for(lambda: not source.status()["connected"], what="the source to notice")
        await asyncio.sleep(0.6)  # a dozen backoff steps: a resubscribe loop would show by now
        await fake.send_chat("alice", "nobody reads this")
        await chat.settle()
        status_now = source.status()
    assert subscription_posts(fake) == posts
    assert chat.texts == []
    assert status_now["revoked"] == {"channel.chat.message": status}
    assert status_now["connected"] is False
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and status in errors[0] and "channel.chat.message" in errors[0]
    expected = "token revoked" if status == "authorization_revoked" else f"subscription revoked ({status})"
    assert status_now["last_error"].startswith(expected)


async def test_a_revoked_reward_subscription_leaves_chat_running(fake: FakeTwitch) -> None:
    source = make_source(fake, settings(broadcaster_token=BROADCASTER_TOKEN, reward_title="Prompt"))
    async with connected(fake, source, subscriptions=2) as chat:
        posts = subscription_posts(fake)
        await fake.revoke("channel.channel_points_custom_reward_redemption.add", "authorization_revoked")
        await fake.wait_for(lambda: source.status()["revoked"] != {}, what="the revocation")
        await asyncio.sleep(0.3)
        await fake.send_chat("alice", "chat goes on")
        await chat.wait_count(1)
        assert source.status()["connected"] is True
    assert subscription_posts(fake) == posts
    assert source.status()["revoked"] == {"channel.channel_points_custom_reward_redemption.add":
                                          "authorization_revoked"}


async def test_a_repeated_revocation_is_reported_once(fake: FakeTwitch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # the bot is the broadcaster: one socket carries both subscriptions, so it stays open after one goes
    own = settings(user_token=BROADCASTER_TOKEN, refresh_token="", reward_title="Prompt")
    source = make_source(fake, own)
    async with connected(fake, source, subscriptions=2) as chat:
        (conn,) = fake.open_connections()
        sub = next(s for s in conn.subscriptions.values() if s["type"] == "channel.chat.message")
        await fake.send_revocation(conn, sub, "user_removed")
        await fake.send_revocation(conn, sub, "user_removed")  # at-least-once, like every EventSub message
        await fake.wait_for(lambda: source.status()["revoked"] != {}, what="the revocation")
        await fake.redeem("alice", user_input="still redeemable")
        await chat.wait_count(1)
        assert conn.open
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    assert chat.texts == ["still redeemable"]


async def test_offline_start_then_twitch_appears() -> None:
    with socket.socket() as probe:  # a free port where nothing listens yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    source = TwitchSource(settings(eventsub_url=f"ws://127.0.0.1:{port}/ws", api_url=f"{url}/helix",
                                   auth_url=f"{url}/oauth2"), backoff_base=0.05, backoff_max=0.2)
    async with running(source) as chat:
        await asyncio.sleep(0.3)
        status = source.status()
        assert not status["connected"] and status["last_error"]
        async with FakeTwitch(port=port) as fake:
            await fake.wait_subscribed(timeout=5)
            await fake.send_chat("alice", "hello")
            await chat.wait_count(1)
            assert source.status()["connected"]


# ----------------------------------------------------------------------------------------------- replies


async def test_replies_go_to_helix_rate_limited(fake: FakeTwitch) -> None:
    source = make_source(fake)
    async with connected(fake, source) as chat:
        await fake.send_chat("alice", "!prompt a castle")
        (event,) = await chat.wait_count(1)
        await source.reply("accepted: a castle", reply_to=event)
        for i in range(29):
            await source.reply(f"reply {i}")
        await chat.settle()
        # Twitch sends the bot's messages back as chat (the fake too, as thread replies where they are):
        # they are not chat to steer with
        assert chat.texts == ["!prompt a castle"]
        assert source.status()["own_echoes_dropped"] == 20
    assert len(fake.sent_messages) == 20  # Twitch allows 20 per 30 s: the burst, then drops
    first = fake.sent_messages[0]
    assert first["message"] == "accepted: a castle"
    assert first["reply_parent_message_id"] == event.message_id
    assert first["broadcaster_id"] == fake.broadcaster_id and first["sender_id"] == fake.bot_id
    assert "reply_parent_message_id" not in fake.sent_messages[1]
    status = source.status()
    assert status["replies_sent"] == 20 and status["replies_dropped"] == 10
    assert status["replies_available"] == 0


async def test_a_moderator_bot_may_send_100_replies_per_30_s(fake: FakeTwitch) -> None:
    fake.user_badges["promptbot"] = ["moderator"]  # Twitch shows the bot's badges on its own messages
    source = make_source(fake)
    async with connected(fake, source):
        await source.reply("hello chat")  # its echo shows the moderator badge
        await fake.wait_for(lambda: source.status()["reply_limit"] == 100, what="the limit raised")
        for i in range(150):
            await source.reply(f"announcement {i}")
    assert len(fake.sent_messages) == 100
    assert source.status()["bot_role"] == "moderator"


async def test_a_bot_that_is_the_broadcaster_may_send_100_from_the_start(fake: FakeTwitch) -> None:
    source = make_source(fake, settings(user_token=BROADCASTER_TOKEN, refresh_token=""))
    async with connected(fake, source):
        for i in range(120):
            await source.reply(f"announcement {i}")
    assert len(fake.sent_messages) == 100
    assert source.status()["bot_role"] == "broadcaster"


async def test_a_fixed_reply_limit_is_kept_whatever_the_role(fake: FakeTwitch) -> None:
    fake.user_badges["promptbot"] = ["moderator"]
    source = make_source(fake, settings(reply_limit=20))
    async with connected(fake, source):
        await source.reply("hello chat")
        await fake.wait_for(lambda: source.status()["bot_role"] == "moderator", what="the role seen")
        for i in range(40):
            await source.reply(f"announcement {i}")
    assert len(fake.sent_messages) == 20


async def test_moderator_confirmations_go_out_when_answers_to_viewers_are_over(fake: FakeTwitch) -> None:
    source = make_source(fake)
    async with connected(fake, source) as chat:
        await fake.send_chat("viewer", "!vote 9")
        await fake.send_chat("mod", "!pause", badges=["moderator"])
        viewer, mod = await chat.wait_count(2)
        for i in range(30):  # a busy minute of refusals
            await source.reply(f"not accepted: {i}", reply_to=viewer)
        await source.reply("steering paused", reply_to=mod)
        await source.reply("Winner: a red fox")  # an announcement
    sent = [m["message"] for m in fake.sent_messages]
    assert sent[-2:] == ["steering paused", "Winner: a red fox"]
    assert len(sent) == 18  # 16 answers to viewers, then the 4 kept back: 2 used
    assert source.status()["replies_available"] == 2


async def test_reply_tokens_come_back_after_the_window(fake: FakeTwitch) -> None:
    source = make_source(fake, reply_limit=3, reply_window=0.4)
    async with connected(fake, source):
        for i in range(5):
            await source.reply(f"burst {i}")
        assert len(fake.sent_messages) == 3
        await asyncio.sleep(0.45)
        await source.reply("later")
    assert [m["message"] for m in fake.sent_messages] == ["burst 0", "burst 1", "burst 2", "later"]


async def test_reply_errors_never_raise(fake: FakeTwitch) -> None:
    idle = make_source(fake)
    await idle.reply("nobody is connected")  # not running: dropped with a log line
    assert idle.status()["replies_dropped"] == 1
    source = make_source(fake)
    async with connected(fake, source):
        fake.chat_error_status = 500
        await source.reply("the server fails")
        fake.chat_error_status = None
        await source.reply("the server works again")
    assert source.status()["replies_failed"] == 1
    assert [m["message"] for m in fake.sent_messages] == ["the server works again"]


async def test_long_replies_are_cut_to_twitchs_limit(fake: FakeTwitch) -> None:
    source = make_source(fake)
    async with connected(fake, source):
        await source.reply("é" * 600)
    assert [m["message"] for m in fake.sent_messages] == ["é" * 500]


async def test_replies_off_in_settings(fake: FakeTwitch) -> None:
    source = make_source(fake, settings(replies=False))
    async with connected(fake, source):
        await source.reply("quiet")
    assert fake.sent_messages == []


# ----------------------------------------------------------------------------------------------- rewards


async def test_redemption_becomes_event_and_refund_cancels_it(fake: FakeTwitch) -> None:
    source = make_source(fake, settings(broadcaster_token=BROADCASTER_TOKEN, reward_title="Steer the stream",
                                        reward_cost=300))
    async with connected(fake, source, subscriptions=2) as chat:
        (reward,) = fake.rewards.values()
        assert reward["title"] == "Steer the stream" and reward["cost"] == 300
        assert reward["is_user_input_required"]
        assert source.status()["reward_id"] == reward["id"]
        redemption_id = await fake.redeem("alice", user_input="a dragon over the sea")
        # Twitch also shows the redemption text in chat, tagged with the reward: not a second event
        await fake.send_chat("alice", "a dragon over the sea", reward_id=reward["id"])
        await fake.redeliver(redemption_id)
        (event,) = await chat.wait_count(1)
        assert event.reward_id == reward["id"] and event.redemption_id == redemption_id
        assert event.text == "a dragon over the sea" and event.login == "alice"
        assert event.roles == {Role.VIEWER}
        await fake.send_chat("bob", "plain chat")
        await chat.wait_count(2)
        await chat.settle()
        assert chat.texts == ["a dragon over the sea", "plain chat"]
        await source.refund(event)
        assert fake.redemptions[redemption_id]["status"] == "CANCELED"
        await source.refund(chat.events[1])  # not a redemption: nothing happens
        status = source.status()
        assert status["redemptions"] == 1 and status["messages"] == 1
    # a restart finds the reward it made instead of creating another
    again = make_source(fake, settings(broadcaster_token=BROADCASTER_TOKEN, reward_title="steer THE stream"))
    async with connected(fake, again, subscriptions=2):
        assert again.status()["reward_id"] == reward["id"]
    assert len(fake.rewards) == 1


async def test_no_reward_without_broadcaster_token(fake: FakeTwitch) -> None:
    source = make_source(fake, settings(reward_title="Steer the stream"))
    async with connected(fake, source):
        assert source.status()["reward_id"] is None
    # a broadcaster_token that is someone else's is refused too, and the bot keeps its own token
    wrong = make_source(fake, settings(reward_title="Steer the stream", broadcaster_token=BOT_TOKEN))
    async with connected(fake, wrong):
        assert wrong.status()["reward_id"] is None
        await wrong.reply("still allowed to talk")
    assert fake.rewards == {}
    assert [m["message"] for m in fake.sent_messages] == ["still allowed to talk"]


async def test_bot_that_is_the_broadcaster_uses_one_token_and_one_socket(fake: FakeTwitch) -> None:
    own = settings(user_token=BROADCASTER_TOKEN, refresh_token="", reward_title="Prompt")
    source = make_source(fake, own)
    async with connected(fake, source, subscriptions=2) as chat:
        (conn,) = fake.open_connections()
        assert len(conn.subscriptions) == 2
        await fake.send_chat("alice", "chat")
        await fake.redeem("alice", user_input="a redemption")
        events = await chat.wait_count(2)
        await source.reply("ok", reply_to=events[0])  # its echo comes from the broadcaster's account ...
        await fake.send_chat("streamer", "ok")  # ... as does what the broadcaster types
        await chat.wait_count(3)
        await chat.settle()
        assert source.status()["own_echoes_dropped"] == 1
    assert [e.text for e in events] == ["chat", "a redemption", "ok"]
    assert events[2].roles == {Role.BROADCASTER}
    assert fake.sent_messages[0]["sender_id"] == fake.broadcaster_id


# ----------------------------------------------------------------------------------------------- AutoMod


def suggestion(message_id: str) -> ChatEvent:
    return ChatEvent(source="twitch", message_id=message_id, user_id="1", login="alice", display_name="Alice",
                     text="(the steering layer passes the cleaned text on its own)", time=0.0)


def automod_requests(fake: FakeTwitch) -> int:
    return fake.requests.count(("POST", "/helix/moderation/enforcements/status"))


def automod_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "AutoMod" in r.getMessage()]


@pytest.mark.parametrize("setup", ["reward_registered_the_token", "bot_is_broadcaster"])
async def test_automod_permits_clean_text(fake: FakeTwitch, setup: str) -> None:
    if setup == "bot_is_broadcaster":  # its own token (with moderation:read) is used
        source, subscriptions = make_source(fake, settings(user_token=BROADCASTER_TOKEN, refresh_token="")), 1
    else:
        source = make_source(fake, settings(broadcaster_token=BROADCASTER_TOKEN, reward_title="Prompt"))
        subscriptions = 2
    async with connected(fake, source, subscriptions=subscriptions):
        validations = fake.requests.count(("GET", "/oauth2/validate"))
        assert await source.automod_permitted(suggestion("m1"), "a castle in the clouds") is True
        assert fake.requests.count(("GET", "/oauth2/validate")) == validations  # registered once, at start
    assert fake.automod_checks == ["a castle in the clouds"]
    assert source.status()["automod_checked"] == 1 and source.status()["automod_failed"] == 0


async def test_automod_holds_forbidden_text(fake: FakeTwitch) -> None:
    fake.automod_forbidden = {"dragon"}
    source = make_source(fake, settings(broadcaster_token=BROADCASTER_TOKEN))  # registered at the first check
    async with connected(fake, source):
        assert await source.automod_permitted(suggestion("m1"), "a red DRAGON") is False
    assert fake.automod_checks == ["a red DRAGON"]
    assert source.status()["automod_held"] == 1


async def test_automod_without_broadcaster_token_fails_open_with_one_warning(
        fake: FakeTwitch, caplog: pytest.LogCaptureFixture) -> None:
    source = make_source(fake)  # the default automod_fail: open
    async with connected(fake, source):
        assert await source.automod_permitted(suggestion("m1"), "a castle") is True
        assert await source.automod_permitted(suggestion("m2"), "a forest") is True
    assert automod_requests(fake) == 0
    (warning,) = automod_warnings(caplog)
    assert "broadcaster_token" in warning
    assert source.status()["automod_failed"] == 2


async def test_automod_missing_scope_fails_closed_when_configured(
        fake: FakeTwitch, caplog: pytest.LogCaptureFixture) -> None:
    narrow = "narrow-token-DO-NOT-LOG"
    fake.add_token(narrow, "streamer", scopes=["channel:manage:redemptions"])
    source = make_source(fake, settings(broadcaster_token=narrow, automod_fail="closed"))
    async with connected(fake, source):
        assert await source.automod_permitted(suggestion("m1"), "a castle") is False
        assert await source.automod_permitted(suggestion("m2"), "a forest") is False
    assert automod_requests(fake) == 0  # known from the token's validation: Twitch is not asked
    (warning,) = automod_warnings(caplog)
    assert "moderation:read" in warning and narrow not in caplog.text


@pytest.mark.parametrize(("status", "mode"), [(429, "open"), (429, "closed"), (500, "closed")])
async def test_automod_http_errors_fail_per_setting(fake: FakeTwitch, caplog: pytest.LogCaptureFixture,
                                                    status: int, mode: str) -> None:
    source = make_source(fake, settings(broadcaster_token=BROADCASTER_TOKEN, automod_fail=mode))
    async with connected(fake, source):
        fake.automod_error_status = status
        answers = [await source.automod_permitted(suggestion(t), t) for t in ("one", "two")]
    assert answers == [mode == "open"] * 2
    assert len(automod_warnings(caplog)) == 1
    # after a 429 Twitch is not asked again for a while (the limit is per minute); after a 500 it is
    assert automod_requests(fake) == (1 if status == 429 else 2)


async def test_automod_asks_twitch_once_per_text(fake: FakeTwitch) -> None:
    source = make_source(fake, settings(broadcaster_token=BROADCASTER_TOKEN), automod_cache_ttl=0.3)
    async with connected(fake, source):
        together = await asyncio.gather(*(source.automod_permitted(suggestion(f"m{i}"), "a castle")
                                          for i in range(3)))  # one check in flight, shared
        assert together == [True] * 3
        assert await source.automod_permitted(suggestion("m3"), "a castle") is True  # cached
        assert await source.automod_permitted(suggestion("m4"), "A castle") is True  # exact text only
        assert fake.automod_checks == ["a castle", "A castle"]
        await asyncio.sleep(0.35)  # the cache entry expired
        assert await source.automod_permitted(suggestion("m5"), "a castle") is True
    assert fake.automod_checks == ["a castle", "A castle", "a castle"]


# ----------------------------------------------------------------------------------------------- tokens


async def test_expired_token_is_refreshed_and_no_secret_is_logged(fake: FakeTwitch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake.expire_token(BOT_TOKEN)  # expired before the start: refreshed while it is added
    source = make_source(fake, settings(broadcaster_token=BROADCASTER_TOKEN, reward_title="Prompt"))
    async with connected(fake, source, subscriptions=2) as chat:
        assert fake.refreshes == 1
        refreshed = next(t for t, d in fake.tokens.items() if t.startswith("refreshed-") and d["valid"])
        fake.expire_token(refreshed)  # expires while running: the next Helix call gets 401
        await source.reply("still here")
        assert fake.refreshes == 2
        assert [m["message"] for m in fake.sent_messages] == ["still here"]
        await fake.send_chat("alice", "hi")
        await chat.wait_count(1)
    text = caplog.text
    assert "refreshed" in text  # the refresh is logged ...
    for secret in [*SECRETS, *(t for t in fake.tokens if t.startswith("refreshed-"))]:
        assert secret not in text  # ... and no token, refresh token or secret
    assert all(secret not in str(source.status()) for secret in SECRETS)


async def test_bad_client_secret_reports_a_redacted_error(fake: FakeTwitch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    source = make_source(fake, settings(client_secret="wrong-secret-DO-NOT-LOG"))
    async with running(source):
        await fake.wait_for(lambda: source.status()["last_error"] is not None, what="an error")
        await asyncio.sleep(0.2)  # a few retries
    error = source.status()["last_error"]
    assert "403" in error and not source.status()["connected"]
    for text in (error, caplog.text):
        assert "wrong-secret-DO-NOT-LOG" not in text and BOT_REFRESH not in text


# ----------------------------------------------------------------------------------------------- local


async def test_local_source_emits_what_is_said() -> None:
    source = LocalSource()
    assert isinstance(source, ChatSource)
    said = await source.say("panel", "a quiet forest")  # queued before run: kept
    async with running(source) as chat:
        await source.say("guest", "a loud city", roles={Role.VIEWER})
        events = await chat.wait_count(2)
        assert events[0] == said
        assert events[0].roles == {Role.BROADCASTER} and events[0].is_moderator
        assert events[0].source == "local"
        assert events[1].roles == {Role.VIEWER} and events[1].login == "guest"
        await source.reply("accepted", reply_to=events[1])
        await source.refund(events[1])  # nothing to refund
        status = source.status()
        assert status["connected"] and status["messages"] == 2 and status["reconnects"] == 0
    assert list(source.replies) == [("accepted", events[1].message_id)]
    assert not source.status()["connected"]


def test_sources_satisfy_the_protocol() -> None:
    assert isinstance(create_source(settings()), TwitchSource)
    assert isinstance(create_source(settings()), ChatSource)
    assert isinstance(create_source(LocalSource().settings), LocalSource)


# ----------------------------------------------------------------------------------------------- units


def test_recent_ids_is_a_bounded_lru() -> None:
    recent = RecentIds(3)
    assert [recent.seen(k) for k in "abca"] == [False, False, False, True]
    assert recent.seen("d") is False  # evicts b (a was just used)
    assert recent.seen("a") is True and recent.seen("b") is False
    assert len(recent) == 3


def test_reply_limiter_never_allows_more_than_limit_per_window() -> None:
    now = [0.0]
    limiter = ReplyLimiter(20, 30.0, clock=lambda: now[0])
    sent: list[float] = []
    for step in range(2000):  # try to send every 0.1 s for 200 s
        now[0] = step * 0.1
        if limiter.try_acquire():
            sent.append(now[0])
    assert len(sent) > 20
    for i, start in enumerate(sent):
        assert sum(1 for t in sent[i:] if t < start + 30.0) <= 20


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    random.seed(7)
    for attempt in range(12):
        step = min(8.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 0.5, 8.0) for _ in range(50)]
        assert all(step / 2 <= d <= step for d in delays)
        assert len(set(delays)) > 1


def test_roles_from_badges() -> None:
    assert roles_from_badges([]) == {Role.VIEWER}
    assert roles_from_badges([], is_broadcaster=True) == {Role.BROADCASTER}
    assert roles_from_badges([{"set_id": "vip"}, {"set_id": "founder"}]) == {Role.VIP, Role.SUBSCRIBER}


def test_redactor_hides_secrets_and_oauth_parameters() -> None:
    redact = _Redactor()
    redact.add("sekrit-token-1234")
    text = redact("POST https://id.twitch.tv/oauth2/token?client_id=abc&client_secret=s3cr3t"
                  "&refresh_token=r3fr&grant_type=refresh_token failed; header Bearer abc.def; OAuth xyz;"
                  " value sekrit-token-1234")
    assert "s3cr3t" not in text and "r3fr" not in text and "abc.def" not in text and "xyz" not in text
    assert "sekrit-token-1234" not in text
    assert "client_id=abc" in text and "grant_type=refresh_token" in text


def test_chat_package_imports_no_heavy_modules() -> None:
    code = ("import sys, chat.sources, chat.sources.twitch, chat.sources.local; "
            "bad = [m for m in ('torch', 'broadcaster', 'engine') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------------------ steering


async def test_twitch_chat_lines_become_suggestions_votes_and_answers(fake: FakeTwitch) -> None:
    from chat.memory_store import MemoryStore
    from chat.settings import ChatSettings
    from chat.steering import Steering, SteeringHooks

    source = make_source(fake)
    store = MemoryStore()

    async def reply(event: ChatEvent, text: str) -> None:
        await source.reply(text, event)

    steering = Steering(ChatSettings(mode="vote", vote={"min_suggestions": 2, "options": 2}), store,
                        hooks=SteeringHooks(reply=reply))
    task = asyncio.create_task(source.run(steering.handle))
    try:
        await fake.wait_subscribed("channel.chat.message")
        await fake.wait_for(lambda: source.status()["connected"], what="source connected")
        await fake.send_chat("alice", "!prompt a red fox in the snow")
        await fake.send_chat("bob", "!p a blue whale in the sea")
        for _ in range(50):
            if len(await store.suggestions()) == 2:
                break
            await asyncio.sleep(0.05)
        await steering.tick()
        await fake.send_chat("carol", "!vote 2")
        await fake.send_chat("dave", "!vote 2")
        for _ in range(50):
            current = await store.current_round()
            if current and sum(current.tally) == 2:
                break
            await asyncio.sleep(0.05)
        await fake.wait_for(lambda: len(fake.sent_messages) >= 2, what="replies")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [o.raw for o in current.options] == ["a red fox in the snow", "a blue whale in the sea"]
    assert list(current.tally) == [0, 2]
    assert any("added" in str(m) for m in fake.sent_messages)
