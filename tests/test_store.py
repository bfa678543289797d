"""The steering store contract, run against MemoryStore and RedisStore (a private real redis-server).

The first part is one suite parametrised over both implementations; the second covers what
only Redis has: many concurrent voters on one connection pool, a restart of the store object,
a restart (and a crash) of Redis itself, Redis down or hung.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat.events import Draft, Intake, QueuedPrompt
from chat.memory_store import MemoryStore, RoundNotFound, RoundStillOpen
from chat.redis_store import RedisStore, StoreUnavailable
from chat.store import SteeringStore
from tests.redis_server import RedisServer, redis_available
from tests.servers import free_port

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server not installed")


def _channel() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the module; tests stay apart by using their own channel."""
    if not redis_available():
        pytest.skip("redis-server not installed")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (to stop, restart or pause), AOF on."""
    if not redis_available():
        pytest.skip("redis-server not installed")
    with RedisServer(tmp_path, appendonly=True) as server:
        yield server


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.servers)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SteeringStore]:
    """Each implementation in turn, empty."""
    if request.param == "memory":
        s: MemoryStore | RedisStore = MemoryStore()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisStore(server.url, _channel())
    try:
        yield s
    finally:
        await s.close()


async def _pool_of(s: SteeringStore, n: int) -> list:
    return [await s.add_suggestion(f"prompt {i}", f"raw {i}", f"u{i}", f"login{i}", "local", 100.0 + i)
            for i in range(n)]


# -- the contract, both implementations --------------------------------------------------------


@pytest.mark.parametrize("cls", [MemoryStore, RedisStore])
def test_implementations_match_the_protocol_signatures(cls: type) -> None:
    for name, member in vars(SteeringStore).items():
        if name.startswith("_") or not inspect.iscoroutinefunction(member):
            continue
        impl = getattr(cls, name)
        assert inspect.iscoroutinefunction(impl), name
        assert list(inspect.signature(impl).parameters.values()) == list(
            inspect.signature(member).parameters.values()), name


def test_chat_store_modules_import_neither_torch_nor_other_packages() -> None:
    code = ("import sys, chat.memory_store, chat.redis_store; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'broadcaster', 'engine'}); "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stdout + res.stderr


async def test_suggestions_add_list_remove(store: SteeringStore) -> None:
    assert await store.suggestions() == []
    a = await store.add_suggestion("a cat, watercolor", "a cat", "u1", "alice", "twitch", 1700000000.125)
    b = await store.add_suggestion("a dog 🐕: ünïcode\nline", "a dog", "u:2", "bob", "local", 2.0)
    c = await store.add_suggestion("a fox", "a fox", "u3", "carol", "local", 3.0)
    assert len({a.id, b.id, c.id}) == 3
    assert (a.text, a.raw, a.user_id, a.login, a.source, a.time) == (
        "a cat, watercolor", "a cat", "u1", "alice", "twitch", 1700000000.125)
    assert await store.suggestions() == [a, b, c]
    assert await store.suggestions(limit=2) == [a, b]
    assert await store.suggestions(limit=0) == []

    await store.remove_suggestions([b.id, "999999-0", "not-an-id"])
    assert await store.suggestions() == [a, c]
    await store.remove_suggestions([])
    await store.remove_suggestions([a.id, c.id])
    assert await store.suggestions() == []


async def test_add_suggestions_adds_a_batch_in_order(store: SteeringStore) -> None:
    first = await store.add_suggestion("one", "one", "u1", "alice", "twitch", 1.0)
    drafts = [Draft(f"p {i}", f"raw {i}", f"u{i}", f"login{i}", "channel_points", 10.0 + i) for i in range(5)]
    added = await store.add_suggestions(drafts)
    assert [(s.text, s.raw, s.user_id, s.login, s.source, s.time) for s in added] == list(map(tuple, drafts))
    assert len({s.id for s in added} | {first.id}) == 6
    assert await store.suggestions() == [first, *added]
    assert await store.add_suggestions([]) == []


async def test_round_open_takes_options_out_of_the_pool(store: SteeringStore) -> None:
    assert await store.current_round() is None
    a, b, c = await _pool_of(store, 3)
    rnd = await store.open_round([a, b], opened_at=10.0, closes_at=30.0)
    assert (rnd.options, rnd.opened_at, rnd.closes_at, rnd.closed, rnd.tally) == ((a, b), 10.0, 30.0, False,
                                                                                  (0, 0))
    assert await store.suggestions() == [c]
    assert await store.current_round() == rnd

    with pytest.raises(RoundStillOpen):
        await store.open_round([c], 11.0, 31.0)
    assert await store.suggestions() == [c]  # a refused round takes nothing

    with pytest.raises(ValueError):
        await store.open_round([], 11.0, 31.0)


async def test_round_vote_close_tally(store: SteeringStore) -> None:
    options = await _pool_of(store, 3)
    rnd = await store.open_round(options, 0.0, 20.0)
    assert (await store.cast_vote(rnd.id, "v1", 1)).tally == (1, 0, 0)
    assert (await store.cast_vote(rnd.id, "v2", 3)).tally == (1, 0, 1)
    assert (await store.cast_vote(rnd.id, "v3", 3)).tally == (1, 0, 2)
    assert (await store.current_round()).tally == (1, 0, 2)

    closed = await store.close_round(rnd.id)
    assert closed.closed and closed.tally == (1, 0, 2)
    assert closed.id == rnd.id and closed.options == rnd.options
    # The last closed round stays current until the next one opens; closing again is harmless.
    assert await store.current_round() == closed
    assert await store.close_round(rnd.id) == closed

    nxt = await store.open_round(await _pool_of(store, 2), 21.0, 41.0)
    assert nxt.id != rnd.id and nxt.tally == (0, 0)
    assert await store.current_round() == nxt
    # The new round starts with nobody having voted.
    assert (await store.cast_vote(nxt.id, "v1", 2)).reason == "counted"


async def test_one_vote_per_user_last_vote_counts(store: SteeringStore) -> None:
    rnd = await store.open_round(await _pool_of(store, 3), 0.0, 20.0)
    first = await store.cast_vote(rnd.id, "alice", 1)
    assert (first.accepted, first.reason, first.tally) == (True, "counted", (1, 0, 0))
    out = await store.cast_vote(rnd.id, "alice", 1)
    assert out.accepted and out.reason == "unchanged" and out.tally == (1, 0, 0)
    changed = await store.cast_vote(rnd.id, "alice", 2)
    assert (changed.accepted, changed.reason, changed.tally) == (True, "changed", (0, 1, 0))
    again = await store.cast_vote(rnd.id, "alice", 3)
    assert (again.accepted, again.reason, again.tally) == (True, "changed", (0, 0, 1))
    bob = await store.cast_vote(rnd.id, "bob", 3)
    assert (bob.accepted, bob.reason, bob.tally) == (True, "counted", (0, 0, 2))
    assert (await store.close_round(rnd.id)).tally == (0, 0, 2)


async def test_first_vote_counts_mode(store: SteeringStore) -> None:
    rnd = await store.open_round(await _pool_of(store, 2), 0.0, 20.0)
    first = await store.cast_vote(rnd.id, "alice", 1, last_vote_counts=False)
    assert (first.accepted, first.reason, first.tally) == (True, "counted", (1, 0))
    refused = await store.cast_vote(rnd.id, "alice", 2, last_vote_counts=False)
    assert (refused.accepted, refused.reason, refused.tally) == (False, "unchanged", (1, 0))
    same = await store.cast_vote(rnd.id, "alice", 1, last_vote_counts=False)
    assert (same.accepted, same.reason, same.tally) == (True, "unchanged", (1, 0))


async def test_votes_after_close_or_past_closes_at_are_refused(store: SteeringStore) -> None:
    rnd = await store.open_round(await _pool_of(store, 2), 100.0, 120.0)
    assert (await store.cast_vote(rnd.id, "a", 1, now=119.999)).reason == "counted"
    late = await store.cast_vote(rnd.id, "b", 2, now=120.0)
    assert (late.accepted, late.reason, late.tally) == (False, "round_closed", (1, 0))
    await store.close_round(rnd.id)
    for user, option in (("a", 2), ("c", 1), ("c", 9)):
        out = await store.cast_vote(rnd.id, user, option)
        assert (out.accepted, out.reason, out.tally) == (False, "round_closed", (1, 0))
    assert (await store.current_round()).tally == (1, 0)


async def test_bad_option_is_refused_and_changes_nothing(store: SteeringStore) -> None:
    rnd = await store.open_round(await _pool_of(store, 3), 0.0, 20.0)
    await store.cast_vote(rnd.id, "alice", 2)
    for option in (0, 4, -1, 100, True):
        out = await store.cast_vote(rnd.id, "alice", option)  # type: ignore[arg-type]
        assert (out.accepted, out.reason, out.tally) == (False, "bad_option", (0, 1, 0)), option
    assert (await store.cast_vote(rnd.id, "bob", 3)).tally == (0, 1, 1)


async def test_no_round(store: SteeringStore) -> None:
    out = await store.cast_vote("1", "alice", 1)
    assert (out.accepted, out.reason) == (False, "no_round")
    with pytest.raises(RoundNotFound):
        await store.close_round("1")
    first = await store.open_round(await _pool_of(store, 2), 0.0, 20.0)
    assert (await store.cast_vote("no-such-round", "alice", 1)).reason == "no_round"
    assert (await store.cast_vote(str(int(first.id) + 5), "alice", 1)).reason == "no_round"
    await store.close_round(first.id)
    second = await store.open_round(await _pool_of(store, 2), 21.0, 41.0)
    # A vote for an earlier round (a slow chat message) finds it closed.
    assert (await store.cast_vote(first.id, "alice", 1)).reason == "round_closed"
    with pytest.raises(RoundNotFound):
        await store.close_round(first.id)
    assert (await store.current_round()).id == second.id


async def test_queue_fifo_with_ack(store: SteeringStore) -> None:
    assert await store.next_prompt() is None
    assert await store.queue_depth() == 0
    p1 = await store.enqueue("first", "vote", "1-0", 1.5)
    p2 = await store.enqueue("second", "@alice", None, 2.5)
    p3 = await store.enqueue("third", "moderator @bob", None, 3.5)
    assert (p1.text, p1.chosen_by, p1.suggestion_id, p1.time) == ("first", "vote", "1-0", 1.5)
    assert p2.suggestion_id is None
    assert await store.queue_depth() == 3
    assert await store.queued() == [p1, p2, p3]
    assert await store.queued(limit=2) == [p1, p2]

    # The same entry until it is acknowledged, and it stays counted while delivered.
    assert await store.next_prompt() == p1
    assert await store.next_prompt() == p1
    assert await store.queue_depth() == 3
    assert await store.queued() == [p1, p2, p3]

    await store.ack(p1.entry_id)
    assert await store.queued() == [p2, p3]
    assert await store.next_prompt() == p2
    await store.ack(p1.entry_id)  # twice: harmless
    await store.ack("not-an-id")
    await store.ack("1-1")
    assert await store.next_prompt() == p2
    await store.ack(p2.entry_id)
    p4 = await store.enqueue("fourth", "schedule", None, 4.5)
    assert await store.next_prompt() == p3
    await store.ack(p3.entry_id)
    assert await store.next_prompt() == p4
    await store.ack(p4.entry_id)
    assert await store.next_prompt() is None
    assert await store.queue_depth() == 0
    assert await store.queued() == []


async def test_ack_of_an_undelivered_entry_removes_it(store: SteeringStore) -> None:
    p1 = await store.enqueue("first", "vote", None, 1.0)
    p2 = await store.enqueue("second", "vote", None, 2.0)
    await store.ack(p2.entry_id)  # vetoed by a moderator before it played
    assert await store.queued() == [p1]
    assert await store.next_prompt() == p1
    await store.ack(p1.entry_id)
    assert await store.next_prompt() is None


async def test_now_playing_and_history(store: SteeringStore) -> None:
    assert await store.now_playing() is None
    assert await store.history() == []
    prompts = [QueuedPrompt(f"{i}-0", f"prompt {i}", "vote", None if i % 2 else f"{i}-1", float(i))
               for i in range(1, 206)]
    for p in prompts[:3]:
        await store.set_now_playing(p)
    assert await store.now_playing() == prompts[2]
    assert await store.history() == prompts[2::-1]
    assert await store.history(limit=1) == [prompts[2]]
    assert await store.history(limit=0) == []
    for p in prompts[3:]:
        await store.set_now_playing(p)
    history = await store.history(limit=1000)
    assert len(history) == 200  # capped
    assert history[0] == prompts[-1] and history[-1] == prompts[5]


async def test_bans(store: SteeringStore) -> None:
    assert await store.banned() == []
    await store.ban("zebra")
    await store.ban("a naughty word")
    await store.ban("zebra")
    assert await store.banned() == ["a naughty word", "zebra"]


async def test_seen_message_dedupe(store: SteeringStore) -> None:
    assert await store.seen_message("twitch", "m-1") is False
    assert await store.seen_message("twitch", "m-1") is True
    assert await store.seen_message("twitch", "m-1") is True
    assert await store.seen_message("local", "m-1") is False  # ids are per source
    assert await store.seen_message("twitch", "m-2", ttl_s=0.05) is False
    await asyncio.sleep(0.15)
    assert await store.seen_message("twitch", "m-2", ttl_s=0.05) is False  # forgotten after its ttl


def _vote(message_id: str, user: str, option: object, **kw: object) -> Intake:
    return Intake("twitch", message_id, user, option, **kw)  # type: ignore[arg-type]


async def test_ingest_counts_a_batch_of_votes_like_cast_vote(store: SteeringStore) -> None:
    await store.open_round(await _pool_of(store, 3), 0.0, 20.0)
    results, banned = await store.ingest([
        _vote("m1", "alice", 1), _vote("m2", "bob", 3), _vote("m3", "alice", 2), _vote("m4", "alice", 2),
        _vote("m5", "carol", 4), _vote("m6", "dave", 0)])
    assert [(r.duplicate, r.vote.accepted, r.vote.reason) for r in results] == [
        (False, True, "counted"), (False, True, "counted"), (False, True, "changed"),
        (False, True, "unchanged"), (False, False, "bad_option"), (False, False, "bad_option")]
    assert {r.vote.tally for r in results} == {(0, 1, 1)}  # the tally after the whole batch
    assert banned == []
    assert (await store.current_round()).tally == (0, 1, 1)


async def test_ingest_drops_a_redelivered_message_and_counts_its_vote_once(store: SteeringStore) -> None:
    await store.open_round(await _pool_of(store, 2), 0.0, 20.0)
    first, _ = await store.ingest([_vote("m1", "alice", 1), _vote("m1", "alice", 1)])
    assert [r.duplicate for r in first] == [False, True]
    assert first[1].vote is None
    again, _ = await store.ingest([_vote("m1", "alice", 2), _vote("m1", "alice", 1, last_vote_counts=False)])
    assert [r.duplicate for r in again] == [True, True]  # a redelivery carries the same id: nothing counts
    assert (await store.current_round()).tally == (1, 0)
    other_source, _ = await store.ingest([Intake("local", "m1", "alice", 2)])  # ids are per source
    assert other_source[0].vote.reason == "changed"


async def test_ingest_without_an_open_round_or_past_its_end(store: SteeringStore) -> None:
    (none,), _ = await store.ingest([_vote("m0", "alice", 1)])
    assert (none.vote.accepted, none.vote.reason, none.vote.tally) == (False, "no_round", ())
    rnd = await store.open_round(await _pool_of(store, 2), 100.0, 120.0)
    results, _ = await store.ingest([_vote("m1", "a", 1, now=119.5), _vote("m2", "b", 2, now=120.0)])
    assert [(r.vote.accepted, r.vote.reason) for r in results] == [(True, "counted"), (False, "round_closed")]
    await store.close_round(rnd.id)
    (closed,), _ = await store.ingest([_vote("m3", "c", 1)])
    assert (closed.vote.accepted, closed.vote.reason) == (False, "no_round")  # no round is *open*
    assert (await store.current_round()).tally == (1, 0)


async def test_ingest_first_vote_counts_mode(store: SteeringStore) -> None:
    await store.open_round(await _pool_of(store, 2), 0.0, 20.0)
    results, _ = await store.ingest([_vote("m1", "alice", 1, last_vote_counts=False),
                                     _vote("m2", "alice", 2, last_vote_counts=False)])
    assert [(r.vote.accepted, r.vote.reason) for r in results] == [(True, "counted"), (False, "unchanged")]
    assert (await store.current_round()).tally == (1, 0)


async def test_ingest_records_plain_messages_and_returns_the_bans_when_asked(store: SteeringStore) -> None:
    await store.ban("a red dragon")
    results, banned = await store.ingest([Intake("twitch", "c1"), Intake("twitch", "c2")], bans=True)
    assert [(r.duplicate, r.vote) for r in results] == [(False, None), (False, None)]
    assert banned == ["a red dragon"]
    assert await store.seen_message("twitch", "c1") is True  # one record of ids, whichever call made it
    assert await store.ingest([], bans=False) == ([], [])


async def test_ingest_takes_hostile_ids_and_users_verbatim(store: SteeringStore) -> None:
    await store.open_round(await _pool_of(store, 2), 0.0, 20.0)
    nasty = ["", "a,b", "id\nwith\nlines", "\u202eevil", "💥" * 50, "x" * 5000, '"},{"json', "nul\x00byte"]
    items = [_vote(f"m:{text}", f"user:{text}", 1) for text in nasty]
    results, _ = await store.ingest(items)
    assert [r.vote.reason for r in results] == ["counted"] * len(nasty)
    repeated, _ = await store.ingest(items)
    assert all(r.duplicate for r in repeated)
    assert (await store.current_round()).tally == (len(nasty), 0)


async def test_two_channels_are_isolated(store: SteeringStore, request: pytest.FixtureRequest) -> None:
    # A second store for another channel: on the same Redis for RedisStore.
    other = (RedisStore(request.getfixturevalue("redis_server").url, _channel())
             if isinstance(store, RedisStore) else MemoryStore())
    try:
        await store.add_suggestion("mine", "mine", "u1", "a", "local", 1.0)
        rnd = await store.open_round(await _pool_of(store, 2), 0.0, 20.0)
        await store.cast_vote(rnd.id, "u1", 1)
        await store.enqueue("queued here", "vote", None, 1.0)
        await store.ban("here")
        await store.seen_message("twitch", "m")
        await store.set_now_playing(QueuedPrompt("1-0", "x", "vote", None, 1.0))

        assert await other.suggestions() == []
        assert await other.current_round() is None
        assert (await other.cast_vote(rnd.id, "u1", 1)).reason == "no_round"
        assert await other.next_prompt() is None and await other.queue_depth() == 0
        assert await other.banned() == [] and await other.history() == []
        assert await other.now_playing() is None
        assert await other.seen_message("twitch", "m") is False
    finally:
        await other.close()


# -- differential check of the vote rules ------------------------------------------------------

_votes = st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(-1, 4)), max_size=25)


@needs_redis
@pytest.mark.servers
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(votes=_votes, last_vote_counts=st.booleans(), close_after=st.integers(0, 25))
def test_vote_rules_match_a_model_in_both_stores(redis_server: RedisServer, votes: list[tuple[str, int]],
                                                 last_vote_counts: bool, close_after: int) -> None:
    async def run(s: SteeringStore) -> list[tuple[bool, str, tuple[int, ...]]]:
        try:
            rnd = await s.open_round(await _pool_of(s, 3), 0.0, 10.0)
            out = []
            for i, (user, option) in enumerate(votes):
                if i == close_after:
                    await s.close_round(rnd.id)
                o = await s.cast_vote(rnd.id, user, option, last_vote_counts=last_vote_counts)
                out.append((o.accepted, o.reason, o.tally))
            return out
        finally:
            await s.close()

    model: dict[str, int] = {}
    expected = []

    def counts() -> tuple[int, ...]:
        return tuple(sum(1 for v in model.values() if v == k) for k in (1, 2, 3))

    for i, (user, option) in enumerate(votes):
        tally = counts()
        if i >= close_after:
            expected.append((False, "round_closed", tally))
        elif not 1 <= option <= 3:
            expected.append((False, "bad_option", tally))
        elif user not in model:
            model[user] = option
            expected.append((True, "counted", counts()))
        elif model[user] == option:
            expected.append((True, "unchanged", tally))
        elif not last_vote_counts:
            expected.append((False, "unchanged", tally))
        else:
            model[user] = option
            expected.append((True, "changed", counts()))

    assert asyncio.run(run(MemoryStore())) == expected
    assert asyncio.run(run(RedisStore(redis_server.url, _channel()))) == expected


# -- Redis only ------------------------------------------------------------------------------

@pytest.mark.servers
@needs_redis
async def test_every_key_lives_under_the_channel_prefix(redis_server: RedisServer) -> None:
    channel = _channel()
    s = RedisStore(redis_server.url, channel)
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        rnd = await s.open_round(await _pool_of(s, 2), 0.0, 20.0)
        await s.cast_vote(rnd.id, "u", 1)
        p = await s.enqueue("x", "vote", None, 1.0)
        await s.next_prompt()
        await s.set_now_playing(p)
        await s.ban("b")
        await s.seen_message("twitch", "m")
        await s.add_suggestion("s", "s", "u", "l", "local", 1.0)
        keys = {k async for k in raw.scan_iter(match=f"*{channel}*")}
        assert keys and all(k.startswith(f"promptcast:{channel}:") for k in keys), keys
        assert {k.removeprefix(f"promptcast:{channel}:") for k in keys} == {
            "suggestions", "round", "round:votes", "round:seq", "queue", "now", "history", "banned",
            "seen:twitch:m"}
        assert await raw.ttl(f"promptcast:{channel}:seen:twitch:m") > 0
    finally:
        await raw.aclose()
        await s.close()


def test_channel_names_are_checked() -> None:
    for bad in ("", "a b", "a:b", "a*", "x" * 65, "-lead"):
        with pytest.raises(ValueError):
            RedisStore("redis://127.0.0.1:1/0", bad)


@pytest.mark.servers
@needs_redis
async def test_thousand_viewers_voting_concurrently_count_once_with_their_last_vote(
        redis_server: RedisServer) -> None:
    """~3,000 concurrent cast_vote calls from 1,000 viewers over a 20-connection blocking pool."""
    channel = _channel()
    store = RedisStore(redis_server.url, channel, max_connections=20)
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    rng = random.Random(20240601)
    options = 4
    choices = [1, 2, 3, 4] * 3 + [0, 5]  # a few bad options among them
    plans = {f"viewer{i}": [rng.choice(choices) for _ in range(rng.randint(1, 5))] for i in range(1000)}
    plans = {v: [*plan, rng.randint(1, options)] if all(not 1 <= o <= options for o in plan) else plan
             for v, plan in plans.items()}  # everyone casts at least one valid vote
    try:
        rnd = await store.open_round(await _pool_of(store, options), 0.0, 60.0)

        async def viewer(user: str, plan: list[int]) -> list[str]:
            reasons = []
            for option in plan:  # one viewer's votes are sequential: "last" is well defined
                reasons.append((await store.cast_vote(rnd.id, user, option)).reason)
            return reasons

        results = await asyncio.gather(*(viewer(u, p) for u, p in plans.items()))
        calls = sum(len(p) for p in plans.values())
        assert calls > 2500

        expected = [0] * options
        for plan in plans.values():
            last_valid = [o for o in plan if 1 <= o <= options][-1]
            expected[last_valid - 1] += 1
        final = await store.close_round(rnd.id)
        assert final.tally == tuple(expected)
        assert sum(final.tally) == 1000
        assert await raw.hlen(f"promptcast:{channel}:round:votes") == 1000

        for plan, reasons in zip(plans.values(), results, strict=True):
            valid = [o for o in plan if 1 <= o <= options]
            assert reasons.count("counted") == 1
            assert reasons.count("bad_option") == len(plan) - len(valid)
        # The blocking pool bounded the connections (they stay open, idle, after the storm).
        ours = [c for c in await raw.client_list() if c["name"] == f"promptcast:{channel}"]
        assert 1 <= len(ours) <= 20
    finally:
        await raw.aclose()
        await store.close()


@pytest.mark.servers
@needs_redis
async def test_close_during_a_storm_of_votes_counts_nothing_after_it(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, _channel(), max_connections=10)
    try:
        rnd = await store.open_round(await _pool_of(store, 3), 0.0, 60.0)

        async def vote(i: int):
            await asyncio.sleep(random.random() * 0.05)
            return await store.cast_vote(rnd.id, f"v{i}", i % 3 + 1)

        async def close():
            await asyncio.sleep(0.02)
            return await store.close_round(rnd.id)

        *outcomes, closed = await asyncio.gather(*(vote(i) for i in range(600)), close())
        assert (await store.current_round()).tally == closed.tally
        accepted = sum(o.accepted for o in outcomes)
        assert sum(closed.tally) == accepted
        assert all(o.reason == "round_closed" for o in outcomes if not o.accepted)
    finally:
        await store.close()


@pytest.mark.servers
@needs_redis
@pytest.mark.parametrize("consumer", ["player", "player-2"])
async def test_a_new_store_object_resumes_queue_and_round(redis_server: RedisServer, consumer: str) -> None:
    """The channel process restarts: a new RedisStore on the same Redis (same or another consumer name)."""
    channel = _channel()
    before = RedisStore(redis_server.url, channel)
    prompts = [await before.enqueue(f"p{i}", "vote", None, float(i)) for i in range(3)]
    assert await before.next_prompt() == prompts[0]  # delivered, the engine never confirmed it
    rnd = await before.open_round(await _pool_of(before, 2), 0.0, 60.0)
    await before.cast_vote(rnd.id, "alice", 1)
    await before.cast_vote(rnd.id, "bob", 2)
    await before.cast_vote(rnd.id, "bob", 1)
    await before.close()  # as if the process died: nothing acknowledged

    after = RedisStore(redis_server.url, channel, consumer=consumer)
    try:
        assert await after.queue_depth() == 3
        assert await after.queued() == prompts
        current = await after.current_round()
        assert current is not None and current.id == rnd.id and not current.closed and current.tally == (2, 0)
        assert (await after.cast_vote(rnd.id, "bob", 1)).reason == "unchanged"  # bob's vote is remembered
        assert (await after.cast_vote(rnd.id, "carol", 2)).tally == (2, 1)

        played = []
        while (p := await after.next_prompt()) is not None:
            assert await after.next_prompt() == p  # until acknowledged
            played.append(p)
            await after.ack(p.entry_id)
        assert played == prompts  # nothing lost, nothing twice, in order
        assert await after.queue_depth() == 0

        # And the old process's consumer holds nothing any more.
        again = RedisStore(redis_server.url, channel)
        try:
            assert await again.next_prompt() is None
        finally:
            await again.close()
    finally:
        await after.close()


async def _fill(store: RedisStore) -> tuple[list[QueuedPrompt], str]:
    prompts = [await store.enqueue(f"p{i}", "vote", None, float(i)) for i in range(3)]
    assert await store.next_prompt() == prompts[0]
    rnd = await store.open_round(await _pool_of(store, 2), 0.0, 60.0)
    await store.cast_vote(rnd.id, "alice", 2)
    await store.set_now_playing(prompts[0])
    await store.ban("nope")
    return prompts, rnd.id


@pytest.mark.servers
@needs_redis
@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_redis_restart_with_persistence_keeps_everything(own_redis: RedisServer, how: str) -> None:
    store = RedisStore(own_redis.url, "demo")
    try:
        prompts, round_id = await _fill(store)
        if how == "crash":
            own_redis.kill()  # SIGKILL; AOF with fsync always
            own_redis.start()
        else:
            own_redis.restart()  # same port, data kept

        # The same store object carries on: connections re-made, Lua scripts loaded again.
        assert (await store.cast_vote(round_id, "alice", 1)).tally == (1, 0)
        assert (await store.cast_vote(round_id, "bob", 1)).tally == (2, 0)
        assert await store.now_playing() == prompts[0] and await store.banned() == ["nope"]
        assert await store.queue_depth() == 3
        played = []
        while (p := await store.next_prompt()) is not None:
            played.append(p)
            await store.ack(p.entry_id)
        assert played == prompts
    finally:
        await store.close()


@pytest.mark.servers
@needs_redis
async def test_redis_restart_without_data_the_store_carries_on(own_redis: RedisServer) -> None:
    store = RedisStore(own_redis.url, "demo")
    try:
        _, round_id = await _fill(store)
        own_redis.restart(keep_data=False)  # everything gone, the consumer group too

        assert await store.current_round() is None
        assert (await store.cast_vote(round_id, "alice", 1)).reason == "no_round"
        assert await store.next_prompt() is None
        p = await store.enqueue("fresh", "vote", None, 9.0)
        assert await store.next_prompt() == p
        await store.ack(p.entry_id)
        assert await store.next_prompt() is None
        rnd = await store.open_round(await _pool_of(store, 2), 0.0, 60.0)
        assert (await store.cast_vote(rnd.id, "alice", 2)).reason == "counted"
    finally:
        await store.close()


@pytest.mark.servers
@needs_redis
async def test_redis_restart_with_an_rdb_snapshot(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:  # no AOF: restart(keep_data=True) saves dump.rdb
        store = RedisStore(server.url, "demo")
        try:
            prompts, _ = await _fill(store)
            server.restart(keep_data=True)
            assert (await store.current_round()).tally == (0, 1)
            assert await store.next_prompt() == prompts[0]
        finally:
            await store.close()


@pytest.mark.servers
@needs_redis
async def test_calls_while_redis_is_down_fail_fast_then_recover(own_redis: RedisServer) -> None:
    store = RedisStore(own_redis.url, "demo")  # default time bounds
    try:
        rnd = await store.open_round(await _pool_of(store, 2), 0.0, 60.0)
        own_redis.stop()
        for call in (store.queue_depth(), store.cast_vote(rnd.id, "alice", 1),
                     store.enqueue("x", "vote", None, 1.0), store.next_prompt()):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="redis store"):
                await call
            assert time.monotonic() - t0 < 10
        own_redis.start()
        assert (await store.cast_vote(rnd.id, "alice", 1)).reason == "counted"
    finally:
        await store.close()


@pytest.mark.servers
@needs_redis
async def test_a_hung_redis_fails_within_the_time_bound(own_redis: RedisServer) -> None:
    store = RedisStore(own_redis.url, "demo", op_timeout=1.5, socket_timeout=0.5)
    try:
        await store.enqueue("x", "vote", None, 1.0)
        own_redis.pause()  # accepts TCP, never answers
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.queue_depth()
        assert time.monotonic() - t0 < 5
        own_redis.resume()
        assert await store.queue_depth() == 1
    finally:
        own_redis.resume()
        await store.close()


async def test_the_error_never_shows_the_password() -> None:
    store = RedisStore(f"redis://:hunter2@127.0.0.1:{free_port()}/0", "demo", op_timeout=3)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.queue_depth()
        assert "hunter2" not in str(info.value) and "***" in str(info.value)
    finally:
        await store.close()
