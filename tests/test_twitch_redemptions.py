"""Channel-point redemptions end to end: the real twitchio client against the fake Twitch, the steering core,
and the redemption's status on "Twitch" (FULFILLED when its prompt airs, CANCELED when it never will)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chat.events import REDEMPTION_LABEL, ChatEvent
from chat.memory_store import MemoryStore
from chat.settings import ChatSettings
from chat.sources.twitch import TwitchSource
from chat.steering import Steering, SteeringHooks
from tests.fake_twitch import BROADCASTER_TOKEN, FakeTwitch
from tests.test_twitch_source import make_source, settings

COUNTED: dict[int, list[str]] = {}  # steering -> the labels its `message` hook counted


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwitch]:
    async with FakeTwitch() as server:
        yield server


@contextlib.asynccontextmanager
async def channel(fake: FakeTwitch, clock: Clock,
                  **chat: Any) -> AsyncIterator[tuple[TwitchSource, Steering]]:
    """A Twitch source with a reward feeding a steering core wired as the service wires it."""
    source = make_source(fake, settings(broadcaster_token=BROADCASTER_TOKEN, reward_title="Steer the stream"))
    counted: list[str] = []

    async def reply(event: ChatEvent, text: str) -> None:
        await source.reply(text, event)

    hooks = SteeringHooks(message=counted.append, reply=reply, refund=source.refund, fulfill=source.fulfill)
    steering = Steering(ChatSettings(**chat), MemoryStore(), hooks=hooks, clock=clock)
    COUNTED[id(steering)] = counted
    task = asyncio.create_task(source.run(steering.handle))
    try:
        await fake.wait_subscribed("channel.channel_points_custom_reward_redemption.add")
        await fake.wait_for(lambda: source.status()["connected"], what="source connected")
        yield source, steering
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def status_of(fake: FakeTwitch, redemption_id: str) -> str:
    return fake.redemptions[redemption_id]["status"].upper()


async def until_status(fake: FakeTwitch, redemption_id: str, status: str) -> None:
    await fake.wait_for(lambda: status_of(fake, redemption_id) == status, what=f"{redemption_id} {status}")


async def air_next(steering: Steering, clock: Clock) -> None:
    """What the engine side does at a block boundary once the playing prompt had its time."""
    clock.now += 60
    prompt = await steering.next_switch()
    assert prompt is not None
    await steering.applied(prompt)


async def test_a_redeemed_prompt_is_fulfilled_when_it_airs_not_before(fake: FakeTwitch) -> None:
    clock = Clock()
    async with channel(fake, clock, mode="queue") as (_, steering):
        rid = await fake.redeem("alice", user_input="a lighthouse in a storm")
        await fake.wait_for(lambda: len(steering.redemptions) == 1, what="the redemption queued")
        [queued] = await steering.store.queued()
        assert status_of(fake, rid) == "UNFULFILLED"  # queued is not aired
        assert queued.chosen_by == "@alice (channel points)"
        await air_next(steering, clock)
        await until_status(fake, rid, "FULFILLED")
    assert len(steering.redemptions) == 0


async def test_a_leading_prompt_command_is_stripped_and_the_source_is_channel_points(
        fake: FakeTwitch) -> None:
    clock = Clock()
    async with channel(fake, clock, mode="vote") as (_, steering):
        await fake.redeem("alice", user_input="!prompt a castle made of glass")
        await fake.redeem("bob", user_input="  !P   a forest of lanterns")
        await fake.wait_for(lambda: len(steering.redemptions) == 2, what="both in the pool")
        pool = await steering.store.suggestions()
    assert [s.raw for s in pool] == ["a castle made of glass", "a forest of lanterns"]
    assert {s.source for s in pool} == {REDEMPTION_LABEL}
    assert COUNTED[id(steering)] == [REDEMPTION_LABEL, REDEMPTION_LABEL]  # the messages metric's label


async def test_a_bare_prompt_command_as_the_input_is_refused_and_refunded(fake: FakeTwitch) -> None:
    async with channel(fake, Clock(), mode="vote") as (_, steering):
        rid = await fake.redeem("alice", user_input="!prompt")
        await until_status(fake, rid, "CANCELED")
        assert await steering.store.suggestions() == []


async def test_a_refused_redemption_is_canceled_with_a_reason(fake: FakeTwitch) -> None:
    async with channel(fake, Clock(), mode="vote", moderation={"blocklist": ["gore"]}) as (_, steering):
        rid = await fake.redeem("alice", user_input="lots of gore please")
        await until_status(fake, rid, "CANCELED")
        await fake.wait_for(lambda: fake.sent_messages, what="the reply")
        assert await steering.store.suggestions() == []
    assert "blocked word" in fake.sent_messages[0]["message"]
    assert "reply_parent_message_id" not in fake.sent_messages[0]  # a redemption is no chat message


async def test_redemptions_have_a_rate_budget_of_their_own(fake: FakeTwitch) -> None:
    clock = Clock()
    moderation = {"rate_limit_per_minute": 1, "redemption_rate_limit_per_minute": 1}
    async with channel(fake, clock, mode="vote", moderation=moderation) as (_, steering):
        await fake.send_chat("alice", "!prompt a red fox in the snow")
        first = await fake.redeem("alice", user_input="a blue whale at sea")  # right after a chat prompt
        await fake.wait_for(lambda: len(steering.redemptions) == 1, what="the redemption accepted")
        second = await fake.redeem("alice", user_input="a green dragon asleep")  # over its own budget
        await until_status(fake, second, "CANCELED")
        pool = await steering.store.suggestions()
    assert [s.raw for s in pool] == ["a red fox in the snow", "a blue whale at sea"]
    assert status_of(fake, first) == "UNFULFILLED"


async def test_in_a_vote_the_winning_redemption_airs_and_the_outvoted_one_is_refunded(
        fake: FakeTwitch) -> None:
    clock = Clock()
    vote = {"options": 2, "min_suggestions": 2, "round_seconds": 20}
    async with channel(fake, clock, mode="vote", vote=vote) as (_, steering):
        winner = await fake.redeem("alice", user_input="a castle in the clouds")
        loser = await fake.redeem("bob", user_input="a city under the sea")
        await fake.wait_for(lambda: len(steering.redemptions) == 2, what="both in the pool")
        await steering.tick()
        await fake.send_chat("carol", "!vote 1")
        async with asyncio.timeout(3):
            while sum((await steering.store.current_round()).tally) < 1:
                await asyncio.sleep(0.01)
        clock.now += 21
        await steering.tick()  # the round ends: the winner is queued, the loser will never air
        await until_status(fake, loser, "CANCELED")
        assert status_of(fake, winner) == "UNFULFILLED"
        await air_next(steering, clock)
        await until_status(fake, winner, "FULFILLED")


@pytest.mark.parametrize(("mode", "command"), [("queue", "!veto"), ("vote", "!banprompt haunted carnival")])
async def test_a_redemption_a_moderator_drops_is_refunded(fake: FakeTwitch, mode: str, command: str) -> None:
    async with channel(fake, Clock(), mode=mode) as (_, steering):
        rid = await fake.redeem("alice", user_input="a haunted carnival")
        await fake.wait_for(lambda: len(steering.redemptions) == 1, what="accepted")
        await fake.send_chat("mod", command, badges=["moderator"])
        await until_status(fake, rid, "CANCELED")
        assert await steering.store.queued() == [] and await steering.store.suggestions() == []


async def test_a_redemption_that_waits_too_long_is_refunded(fake: FakeTwitch) -> None:
    clock = Clock()
    chat = {"vote": {"options": 2, "min_suggestions": 2}, "redemptions": {"expire_minutes": 10}}
    async with channel(fake, clock, mode="vote", **chat) as (_, steering):
        rid = await fake.redeem("alice", user_input="a lone tree on a hill")
        await fake.wait_for(lambda: len(steering.redemptions) == 1, what="in the pool")
        clock.now += 9 * 60
        await steering.tick()
        assert status_of(fake, rid) == "UNFULFILLED"
        clock.now += 61
        await steering.tick()
        await until_status(fake, rid, "CANCELED")
        assert await steering.store.suggestions() == []
