"""Steering rules on the in-process store: rounds, ties, vetoes, the queue's limits, pause."""

from __future__ import annotations

import itertools

import pytest

from chat.events import ChatEvent, Role
from chat.memory_store import MemoryStore
from chat.settings import ChatSettings
from chat.steering import Steering, SteeringHooks

_ids = itertools.count()


def _event(login: str, text: str, roles=frozenset({Role.VIEWER}), reward: str | None = None) -> ChatEvent:
    return ChatEvent(source="local", message_id=str(next(_ids)), user_id=login, login=login,
                     display_name=login, text=text, time=0.0, roles=roles, reward_id=reward,
                     redemption_id="r1" if reward else None)


MOD = frozenset({Role.MODERATOR})


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _steering(mode="vote", hooks=None, **chat) -> tuple[Steering, Clock]:
    clock = Clock()
    settings = ChatSettings(mode=mode, **chat)
    return Steering(settings, MemoryStore(), hooks=hooks, clock=clock), clock


async def _round_with(steering: Steering, *texts: str) -> None:
    for i, text in enumerate(texts):
        await steering.handle(_event(f"u{i}", f"!prompt {text}"))
    await steering.tick()


async def test_round_opens_once_enough_suggestions_wait():
    steering, _ = _steering(vote={"min_suggestions": 2, "options": 3})
    await steering.handle(_event("a", "!prompt a red fox"))
    await steering.tick()
    assert await steering.store.current_round() is None
    await steering.handle(_event("b", "!prompt a blue whale"))
    await steering.tick()
    assert len((await steering.store.current_round()).options) == 2


async def test_the_most_voted_option_is_queued_when_the_round_ends():
    steering, clock = _steering(vote={"round_seconds": 10})
    await _round_with(steering, "a red fox", "a blue whale")
    for voter in ("x", "y"):
        await steering.handle(_event(voter, "!vote 2"))
    clock.now += 11
    await steering.tick()
    [queued] = await steering.store.queued()
    assert queued.text == "a blue whale" and "@u1" in queued.chosen_by


async def test_a_tie_goes_to_the_earlier_suggestion():
    steering, clock = _steering(vote={"round_seconds": 10})
    await _round_with(steering, "a red fox", "a blue whale")
    await steering.handle(_event("x", "!vote 2"))
    await steering.handle(_event("y", "!vote 1"))
    clock.now += 11
    await steering.tick()
    assert [q.text for q in await steering.store.queued()] == ["a red fox"]


async def test_a_round_nobody_voted_in_returns_its_options_to_the_pool():
    steering, clock = _steering(vote={"round_seconds": 10})
    await _round_with(steering, "a red fox", "a blue whale")
    clock.now += 11
    await steering.tick()
    assert await steering.store.queued() == []
    assert {s.raw for s in await steering.store.suggestions()} == {"a red fox", "a blue whale"}


async def test_a_vetoed_option_cannot_win():
    steering, clock = _steering(vote={"round_seconds": 10})
    await _round_with(steering, "a red fox", "a blue whale")
    await steering.handle(_event("x", "!vote 2"))
    await steering.handle(_event("mod", "!veto 2", roles=MOD))
    clock.now += 11
    await steering.tick()
    assert await steering.store.queued() == []


async def test_viewers_cannot_use_moderator_commands():
    rejected = []
    steering, _ = _steering(hooks=SteeringHooks(rejected=rejected.append))
    await steering.handle(_event("viewer", "!pause"))
    assert steering.paused is False and rejected == ["not_allowed"]


async def test_pause_holds_switches_and_resume_releases_them():
    steering, _ = _steering(mode="queue", queue={"min_play_seconds": 0})
    await steering.handle(_event("a", "!prompt a red fox"))
    await steering.handle(_event("mod", "!pause", roles=MOD))
    assert await steering.next_switch() is None
    await steering.handle(_event("mod", "!resume", roles=MOD))
    assert (await steering.next_switch()).text == "a red fox"


async def test_queue_mode_enforces_the_cooldown_per_user():
    rejected = []
    steering, clock = _steering(mode="queue", hooks=SteeringHooks(rejected=rejected.append),
                                queue={"user_cooldown_seconds": 30})
    await steering.handle(_event("a", "!prompt a red fox"))
    await steering.handle(_event("a", "!prompt a blue whale"))
    clock.now += 31
    await steering.handle(_event("a", "!prompt a green forest"))
    assert rejected == ["cooldown"]
    assert [q.text for q in await steering.store.queued()] == ["a red fox", "a green forest"]


async def test_queue_mode_caps_prompts_waiting_per_user():
    rejected = []
    steering, _ = _steering(mode="queue", hooks=SteeringHooks(rejected=rejected.append),
                            queue={"user_cooldown_seconds": 0, "max_per_user": 1})
    await steering.handle(_event("a", "!prompt a red fox"))
    await steering.handle(_event("a", "!prompt a blue whale"))
    assert rejected == ["user_cap"]


async def test_a_prompt_stays_on_air_for_the_minimum_play_time_unless_skipped():
    steering, clock = _steering(mode="queue", queue={"min_play_seconds": 10, "user_cooldown_seconds": 0})
    await steering.handle(_event("a", "!prompt a red fox"))
    clock.now += 11  # the starting prompt had its minimum time too
    await steering.applied(await steering.next_switch())
    await steering.handle(_event("b", "!prompt a blue whale"))
    assert await steering.next_switch() is None
    await steering.handle(_event("mod", "!skip", roles=MOD))
    assert (await steering.next_switch()).text == "a blue whale"


async def test_the_same_head_is_offered_until_it_is_applied():
    steering, _ = _steering(mode="queue", queue={"min_play_seconds": 0, "user_cooldown_seconds": 0})
    await steering.handle(_event("a", "!prompt a red fox"))
    await steering.handle(_event("b", "!prompt a blue whale"))
    first = await steering.next_switch()
    assert (await steering.next_switch()).entry_id == first.entry_id
    await steering.applied(first)
    assert (await steering.next_switch()).text == "a blue whale"
    assert (await steering.store.now_playing()).text == "a red fox"


async def test_a_duplicate_delivery_of_one_message_is_handled_once():
    steering, _ = _steering(mode="queue")
    event = _event("a", "!prompt a red fox")
    await steering.handle(event)
    await steering.handle(event)
    assert len(await steering.store.queued()) == 1


async def test_a_refused_redemption_is_refunded():
    refunded = []

    async def refund(event):
        refunded.append(event.redemption_id)

    steering, _ = _steering(hooks=SteeringHooks(refund=refund), moderation={"blocklist": ["gore"]})
    await steering.handle(_event("a", "lots of gore", reward="reward-1"))
    await steering.handle(_event("b", "a calm lake", reward="reward-1"))
    assert refunded == ["r1"]
    assert [s.raw for s in await steering.store.suggestions()] == ["a calm lake"]


async def test_banning_a_prompt_removes_it_from_the_pool_and_refuses_it_later():
    rejected = []
    steering, _ = _steering(hooks=SteeringHooks(rejected=rejected.append))
    await steering.handle(_event("a", "!prompt a red fox"))
    await steering.handle(_event("mod", "!banprompt a red fox", roles=MOD))
    await steering.handle(_event("b", "!prompt A RED FOX"))
    assert await steering.store.suggestions() == []
    assert rejected == ["banned"]


async def test_the_template_wraps_viewer_text_in_the_channel_style():
    steering, _ = _steering(mode="queue", moderation={"template": "{prompt}, {style}", "style": "watercolor"})
    await steering.handle(_event("a", "!prompt a red fox {style}"))
    [queued] = await steering.store.queued()
    assert queued.text == "a red fox {style}, watercolor"


@pytest.mark.parametrize("mode", ["vote", "manual"])
async def test_suggestions_in_vote_and_manual_modes_go_to_the_pool(mode):
    steering, _ = _steering(mode=mode)
    await steering.handle(_event("a", "!prompt a red fox"))
    assert [s.raw for s in await steering.store.suggestions()] == ["a red fox"]
    assert await steering.store.queued() == []


async def test_automod_holds_a_suggestion_our_own_moderation_passed():
    rejected, asked = [], []

    async def automod(event, text):
        asked.append(text)
        return "forbidden" not in text

    steering, _ = _steering(hooks=SteeringHooks(rejected=rejected.append, automod=automod),
                            moderation={"automod": True})
    await steering.handle(_event("a", "!prompt a forbidden scene"))
    await steering.handle(_event("b", "!prompt a calm lake"))
    assert rejected == ["automod"] and asked == ["a forbidden scene", "a calm lake"]
    assert [s.raw for s in await steering.store.suggestions()] == ["a calm lake"]


async def test_automod_is_not_asked_unless_enabled():
    asked = []

    async def automod(event, text):
        asked.append(text)
        return False

    steering, _ = _steering(hooks=SteeringHooks(automod=automod))
    await steering.handle(_event("a", "!prompt a calm lake"))
    assert asked == [] and len(await steering.store.suggestions()) == 1


async def test_round_opening_and_result_are_announced():
    said = []

    async def announce(text):
        said.append(text)

    steering, clock = _steering(hooks=SteeringHooks(announce=announce), vote={"round_seconds": 10})
    await _round_with(steering, "a red fox", "a blue whale")
    await steering.handle(_event("x", "!vote 1"))
    clock.now += 11
    await steering.tick()
    assert said[0].startswith("Vote now with !vote") and "1) a red fox | 2) a blue whale" in said[0]
    assert said[1] == 'Winner: "a red fox" by @u0 (1 votes)'


@pytest.mark.parametrize("off", ["accepted", "refused", "moderator", "rounds"])
async def test_each_kind_of_reply_can_be_turned_off(off):
    said: list[str] = []

    async def reply(event, text):
        said.append(text)

    async def announce(text):
        said.append(text)

    replies = {"accepted": True, "refused": True, "moderator": True, "rounds": True, off: False}
    steering, _ = _steering(hooks=SteeringHooks(reply=reply, announce=announce), replies=replies,
                            vote={"min_suggestions": 2, "options": 2})
    await steering.handle(_event("a", "!prompt a red fox"))  # accepted
    await steering.handle(_event("b", "!prompt"))  # refused: no text
    await steering.handle(_event("c", "!prompt a blue whale"))
    await steering.tick()  # a round opens
    await steering.handle(_event("mod", "!pause", roles=MOD))  # a moderator's confirmation
    kinds = {"accepted": "added to the next vote", "refused": "not accepted: usage: !prompt <text>",
             "moderator": "steering paused", "rounds": "Vote now"}
    for kind, text in kinds.items():
        present = any(line.startswith(text) for line in said)
        assert present is (kind != off), (kind, said)


async def test_a_batch_of_events_is_handled_in_order_with_one_store_step():
    voted, said = [], []

    async def reply(event, text):
        said.append((event.login, text))

    steering, _ = _steering(hooks=SteeringHooks(vote=lambda: voted.append(1), reply=reply),
                            vote={"min_suggestions": 2, "options": 2})
    await _round_with(steering, "a red fox", "a blue whale")
    first = _event("alice", "!vote 1")
    batch = [first, _event("alice", "!vote 2"), first, _event("bob", "!vote 2"), _event("carol", "hello"),
             _event("dave", "!vote 7"), _event("erin", "!prompt a green forest")]
    await steering.handle_many(batch)
    current = await steering.store.current_round()
    assert current.tally == (0, 2)  # alice's last vote counts, her first one's re-delivery does not
    assert len(voted) == 3  # alice twice (counted, then changed), bob
    assert ("dave", "not accepted: choose an option from 1 to 2") in said
    assert [s.raw for s in await steering.store.suggestions()] == ["a green forest"]
    assert steering._intake.batches == 3  # the two setup prompts and the batch: one store step each


async def test_a_remembered_parse_still_tells_moderators_from_viewers():
    said: list[tuple[str, str]] = []

    async def reply(event, text):
        said.append((event.login, text))

    steering, _ = _steering(hooks=SteeringHooks(reply=reply))
    viewer = frozenset({Role.VIEWER})
    for login, roles in (("viewer1", viewer), ("mod", MOD), ("viewer2", viewer)):
        await steering.handle(_event(login, "!pause", roles=roles))
    assert said == [("viewer1", "not accepted: !pause is for moderators"), ("mod", "steering paused"),
                    ("viewer2", "not accepted: !pause is for moderators")]
