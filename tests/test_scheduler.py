"""The scheduler at runtime: a real Steering over the memory store, driven by a fake clock."""

from __future__ import annotations

import asyncio
import itertools
import logging
from datetime import UTC, datetime, timedelta

from broadcaster.schedule import Programme, ScheduleSettings
from broadcaster.scheduler import Scheduler
from chat.events import ChatEvent, Role
from chat.memory_store import MemoryStore
from chat.settings import ChatSettings
from chat.steering import Steering, SteeringHooks
from tests.test_schedule import TIMELINE, WEEK_END, WEEK_PROGRAMME, WEEK_START, schedule

MINUTE = timedelta(minutes=1)
MONDAY = datetime(2026, 3, 23, tzinfo=UTC)

# In UTC: day 06-18 (queue mode), evening 18-22 (vote), night 22-06 (no chat). Items: 10 minutes.
PROGRAMME = {
    "playlists": {
        "day": {"prompts": ["sunrise", "noon", "sunset"], "item_seconds": 600},
        "night": {"prompts": ["stars", "moon"], "item_seconds": 600},
    },
    "windows": [
        {"name": "night", "start": "22:00", "end": "06:00", "playlist": "night", "chat": False},
        {"name": "evening", "start": "18:00", "end": "22:00", "playlist": "day", "mode": "vote"},
        {"name": "day", "start": "06:00", "end": "18:00", "playlist": "day", "mode": "queue"},
    ],
    "autopilot": {"idle_seconds": 300},
}

_ids = itertools.count()


class FakeClock:
    """The scheduler's clock, moved by the test."""

    def __init__(self, start: datetime):
        self.t = start

    def now(self) -> datetime:
        return self.t

    def advance(self, **delta: float) -> None:
        self.t += timedelta(**delta)


class Rig:
    """A scheduler over a real Steering on one fake clock, with what it reported."""

    def __init__(self, start: datetime, programme: dict | ScheduleSettings = PROGRAMME, mode: str = "queue",
                 **chat):
        self.clock = FakeClock(start)
        self.rejected: list[str] = []
        self.replies: list[str] = []
        self.refunds: list[str] = []
        self.boundaries: list[str | None] = []
        self.log: list[tuple[str, str | None]] = []  # boundaries and programme prompts, in order

        async def reply(event, text):
            self.replies.append(text)

        async def refund(event):
            self.refunds.append(event.redemption_id)

        hooks = SteeringHooks(rejected=self.rejected.append, reply=reply, refund=refund)
        chat.setdefault("queue", {"min_play_seconds": 0, "user_cooldown_seconds": 0})
        self.steering = Steering(ChatSettings(mode=mode, **chat), MemoryStore(), hooks=hooks,
                                 clock=lambda: self.clock.now().timestamp())
        settings = programme if isinstance(programme, ScheduleSettings) else ScheduleSettings.model_validate(
            programme)
        self.scheduler = Scheduler(settings, self.steering, self.clock, on_boundary=self._on_boundary)
        enqueue = self.steering.enqueue_direct

        async def logged_enqueue(text, chosen_by):
            self.log.append(("enqueue", text))
            return await enqueue(text, chosen_by)

        self.steering.enqueue_direct = logged_enqueue

    def _on_boundary(self, slot) -> None:
        self.boundaries.append(slot.window)
        self.log.append(("boundary", slot.window))

    async def tick(self, **delta: float):
        """Move the clock (if asked) and tick once."""
        self.clock.advance(**delta)
        return await self.scheduler.tick()

    async def queued(self) -> list[tuple[str, str]]:
        return [(q.text, q.chosen_by) for q in await self.steering.store.queued()]

    async def play(self) -> list[str]:
        """The engine applies everything queued; what it played."""
        played = []
        while (prompt := await self.steering.next_switch()) is not None:
            await self.steering.applied(prompt)
            played.append(prompt.text)
        return played

    async def say(self, login: str, text: str, reward: str | None = None) -> None:
        await self.steering.handle(ChatEvent(
            source="local", message_id=str(next(_ids)), user_id=login, login=login, display_name=login,
            text=text, time=self.clock.now().timestamp(), roles=frozenset({Role.VIEWER}), reward_id=reward,
            redemption_id=f"redemption-{login}" if reward else None))


# --- the autopilot -------------------------------------------------------------------------------


async def test_the_autopilot_takes_over_once_chat_has_been_quiet_for_idle_seconds_not_before():
    rig = Rig(MONDAY.replace(hour=10))

    await rig.tick()
    await rig.tick(seconds=299)
    assert await rig.queued() == []
    assert rig.scheduler.engaged is False

    await rig.tick(seconds=1)
    assert await rig.queued() == [("sunrise", "schedule:day")]
    assert rig.scheduler.engaged is True


async def test_the_autopilot_queues_each_item_once_as_the_programme_moves_on():
    rig = Rig(MONDAY.replace(hour=10))
    played = []
    for _ in range(8):  # 5-minute steps from 10:05 (quiet long enough) to 10:40; items of 10 minutes
        await rig.tick(minutes=5)
        played += await rig.play()

    assert played == ["sunrise", "noon", "sunset", "sunrise", "noon"]  # and round again


async def test_the_autopilot_yields_to_chat_and_takes_over_again_when_chat_is_quiet():
    rig = Rig(MONDAY.replace(hour=10))
    await rig.tick(minutes=5)
    assert await rig.play() == ["sunrise"]

    rig.clock.advance(minutes=3)
    await rig.say("alice", "!prompt a red fox in the snow")  # 10:08
    await rig.tick(seconds=1)
    assert await rig.play() == ["a red fox in the snow"]
    await rig.tick(seconds=149)  # 10:10:30: the programme moves on to "noon"; chat has the channel
    await rig.tick(seconds=149)  # 10:12:59
    assert await rig.queued() == []
    assert rig.scheduler.autopilot == "chat"

    await rig.tick(seconds=1)  # 10:13, 300 s after alice: quiet again
    assert await rig.play() == ["noon"]


async def test_the_programmes_own_prompts_do_not_count_as_chat_activity():
    rig = Rig(MONDAY.replace(hour=10))
    quiet_since = rig.steering.last_activity

    await rig.tick(minutes=5)
    await rig.play()

    assert rig.steering.last_activity == quiet_since


async def test_a_panel_prompt_counts_as_activity():
    rig = Rig(MONDAY.replace(hour=10))
    rig.clock.advance(minutes=4)

    await rig.steering.enqueue_direct("a storm at sea", "panel")
    await rig.play()
    await rig.tick(minutes=1)

    assert rig.steering.last_activity == MONDAY.replace(hour=10, minute=4).timestamp()
    assert await rig.queued() == []


async def test_an_accepted_vote_counts_as_activity_and_a_refused_suggestion_does_not():
    rig = Rig(MONDAY.replace(hour=19), mode="vote", vote={"min_suggestions": 2})
    await rig.tick()
    await rig.say("alice", "!prompt a red fox")
    await rig.say("bob", "!prompt a blue whale")
    await rig.steering.tick()

    rig.clock.advance(seconds=5)
    await rig.say("carol", "!vote 1")
    assert rig.steering.last_activity == rig.clock.now().timestamp()

    rig.clock.advance(seconds=5)
    await rig.say("dave", "!prompt x")  # too short: refused
    assert rig.steering.last_activity == rig.clock.now().timestamp() - 5


async def test_with_the_autopilot_disabled_only_windows_without_chat_play_the_programme():
    rig = Rig(MONDAY.replace(hour=10), programme={**PROGRAMME, "autopilot": {"enabled": False}})

    await rig.tick(hours=1)
    assert await rig.queued() == []

    await rig.tick(hours=12)  # 23:00, night: no chat
    assert await rig.queued() == [("stars", "schedule:night")]


async def test_nothing_is_queued_where_the_programme_has_nothing():
    rig = Rig(MONDAY.replace(hour=10), programme={**PROGRAMME, "windows": PROGRAMME["windows"][:1]})

    await rig.tick(hours=2)

    assert await rig.queued() == []
    assert rig.scheduler.autopilot == "off"
    assert (rig.steering.chat_enabled, rig.steering.mode) == (True, "queue")


async def test_a_default_playlist_plays_between_windows():
    rig = Rig(MONDAY.replace(hour=10), programme={**PROGRAMME, "windows": PROGRAMME["windows"][:1],
                                                  "default_playlist": "day"})

    await rig.tick(minutes=5)

    [(text, chosen_by)] = await rig.queued()
    assert chosen_by == "schedule:default" and text in {"sunrise", "noon", "sunset"}


# --- per-window chat policy ----------------------------------------------------------------------


async def test_a_window_without_chat_refuses_suggestions_and_votes_with_steering_off():
    rig = Rig(MONDAY.replace(hour=23))
    await rig.tick()

    await rig.say("alice", "!prompt a red fox")
    await rig.say("bob", "a calm lake", reward="reward-1")
    await rig.say("carol", "!vote 1")

    assert rig.rejected == ["steering_off"] * 3
    assert rig.replies == ["not accepted: chat steering is off during this programme"] * 3
    assert rig.refunds == ["redemption-bob"]
    assert (await rig.steering.state())["chat_enabled"] is False
    assert await rig.queued() == [("stars", "schedule:night")]


async def test_in_a_window_without_chat_the_programme_plays_at_once_whatever_chat_just_did():
    rig = Rig(MONDAY.replace(hour=21, minute=59), mode="queue")
    await rig.tick()
    await rig.say("alice", "!prompt a red fox")  # a moment ago: chat is on until 22:00

    await rig.tick(minutes=1)

    assert await rig.queued() == [("stars", "schedule:night")]


async def test_chat_steers_again_when_a_window_without_chat_ends():
    rig = Rig(MONDAY.replace(hour=5, minute=59))
    await rig.tick()
    assert rig.steering.chat_enabled is False

    await rig.tick(minutes=1)
    await rig.say("alice", "!prompt a red fox")

    assert rig.steering.chat_enabled is True and rig.rejected == []


async def test_each_window_sets_its_chat_mode_and_one_without_a_mode_takes_chat_mode():
    rig = Rig(MONDAY.replace(hour=10), mode="manual")

    await rig.tick()
    assert rig.steering.mode == "queue"
    await rig.tick(hours=8)
    assert rig.steering.mode == "vote"
    await rig.tick(hours=4)
    assert (rig.steering.mode, rig.steering.chat_enabled) == ("manual", False)


async def test_a_suggestion_follows_the_mode_of_the_window():
    rig = Rig(MONDAY.replace(hour=17, minute=59))
    await rig.tick()
    await rig.say("alice", "!prompt a red fox")  # day: queue mode
    await rig.tick(minutes=1)
    await rig.say("bob", "!prompt a blue whale")  # evening: vote mode, into the pool

    assert [text for text, _ in await rig.queued()] == ["a red fox"]
    assert [s.raw for s in await rig.steering.store.suggestions()] == ["a blue whale"]


# --- boundaries ----------------------------------------------------------------------------------


async def test_at_a_boundary_on_boundary_is_called_before_the_new_item_is_queued():
    rig = Rig(MONDAY.replace(hour=21, minute=50))
    await rig.tick()

    await rig.tick(minutes=10)

    assert rig.log == [("boundary", "night"), ("enqueue", "stars")]


async def test_starting_up_is_not_a_boundary():
    rig = Rig(MONDAY.replace(hour=23))

    await rig.tick()
    await rig.tick(minutes=1)

    assert rig.boundaries == []


async def test_no_boundary_is_reported_when_reanchor_on_boundary_is_off():
    rig = Rig(MONDAY.replace(hour=21, minute=59), programme={**PROGRAMME, "reanchor_on_boundary": False})

    await rig.tick()
    await rig.tick(minutes=1)

    assert rig.boundaries == []
    assert await rig.queued() == [("stars", "schedule:night")]


async def test_a_failing_on_boundary_does_not_keep_the_next_item_off_the_air(caplog):
    rig = Rig(MONDAY.replace(hour=21, minute=59))

    def broken(slot):
        raise RuntimeError("engine gone")

    rig.scheduler.on_boundary = broken
    await rig.tick()
    await rig.tick(minutes=1)

    assert await rig.queued() == [("stars", "schedule:night")]
    assert "on_boundary failed" in caplog.text


async def test_a_whole_week_on_the_clock_applies_every_boundary_once_with_its_chat_policy():
    settings = schedule(WEEK_PROGRAMME)
    boundaries = Programme(settings).boundaries(WEEK_START, WEEK_END)
    rig = Rig(boundaries[0] - MINUTE, programme=settings, mode="manual")
    expected_policy = {"night": (False, "manual"), "evening": (True, "vote"), "day": (True, "queue"),
                       "nyc-lunch": (True, "manual"), "gap": (True, "manual"), None: (True, "manual")}

    on_air = None
    for boundary in boundaries:
        for t in (boundary - MINUTE, boundary, boundary + MINUTE):
            rig.clock.t = t
            slot = await rig.scheduler.tick()
            window = [w for start, w in TIMELINE if start <= t][-1]
            assert slot.window == window, t
            assert (rig.steering.chat_enabled, rig.steering.mode) == expected_policy[window], t
            on_air = ([on_air] + await rig.play())[-1]
            if window == "night":  # no chat: the programme plays from the first minute
                assert on_air == slot.prompt, t

    assert rig.boundaries == [[w for start, w in TIMELINE if start <= b][-1] for b in boundaries]


# --- queued prompts, pauses, reloads -------------------------------------------------------------


async def test_prompts_a_moderator_queued_play_before_the_programme_goes_on_with_its_next_item():
    rig = Rig(MONDAY.replace(hour=23))
    await rig.tick()
    assert await rig.play() == ["stars"]

    await rig.steering.enqueue_direct("a storm at sea", "panel")
    await rig.tick(seconds=1)
    assert rig.scheduler.autopilot == "waiting"
    assert await rig.play() == ["a storm at sea"]
    await rig.tick(minutes=5)
    assert await rig.queued() == []  # the storm keeps the rest of "stars"' time

    await rig.tick(minutes=5)  # 23:10
    assert await rig.play() == ["moon"]


async def test_a_waiting_programme_prompt_is_replaced_not_piled_up():
    rig = Rig(MONDAY.replace(hour=23))
    rig.steering.paused = True  # a moderator paused steering: nothing is applied

    for _ in range(3):
        await rig.tick(minutes=10)

    assert await rig.queued() == [("moon", "schedule:night")]  # 23:30's item, not three of them


async def test_replace_swaps_the_programme_and_a_changed_current_item_plays():
    rig = Rig(MONDAY.replace(hour=23))
    await rig.tick()
    assert await rig.play() == ["stars"]

    changed = {**PROGRAMME, "playlists": {**PROGRAMME["playlists"],
                                          "night": {"prompts": ["fireflies", "moon"], "item_seconds": 600}}}
    rig.scheduler.replace(ScheduleSettings.model_validate(changed))
    await rig.tick(seconds=1)

    assert await rig.play() == ["fireflies"]
    assert rig.boundaries == []  # the same window goes on: not a boundary


async def test_replace_with_the_same_current_item_queues_nothing_new():
    rig = Rig(MONDAY.replace(hour=23))
    await rig.tick()
    await rig.play()

    rig.scheduler.replace(ScheduleSettings.model_validate(PROGRAMME))
    await rig.tick(seconds=1)

    assert await rig.queued() == []


async def test_replace_that_opens_another_window_is_a_boundary():
    rig = Rig(MONDAY.replace(hour=23))
    await rig.tick()
    await rig.play()

    show = {"name": "late-show", "start": "23:00", "end": "23:30", "playlist": "day", "chat": False}
    late = {**PROGRAMME, "windows": [show, *PROGRAMME["windows"]]}
    rig.scheduler.replace(ScheduleSettings.model_validate(late))
    await rig.tick(seconds=1)

    assert rig.boundaries == ["late-show"]
    assert await rig.play() == ["sunrise"]


# --- status and the loop -------------------------------------------------------------------------


async def test_status_reports_the_window_the_autopilot_and_the_next_boundary():
    rig = Rig(MONDAY.replace(hour=21, minute=30))
    await rig.tick(minutes=5)

    status = rig.scheduler.status()

    assert {k: status[k] for k in ("window", "playlist", "prompt", "autopilot", "chat", "mode")} == {
        "window": "evening", "playlist": "day", "prompt": "sunrise", "autopilot": True, "chat": True,
        "mode": "vote"}
    assert status["next_boundary"] == "2026-03-23T22:00:00+00:00"
    assert status["seconds_to_boundary"] == 25 * 60
    assert status["item_ends_at"] == "2026-03-23T21:40:00+00:00"


async def test_run_ticks_until_cancelled_and_logs_a_repeated_error_once(caplog):
    rig = Rig(MONDAY.replace(hour=23))
    calls = 0
    now = rig.clock.now

    def flaky_now():
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise OSError("clock unavailable")
        return now()

    rig.clock.now = flaky_now
    with caplog.at_level(logging.ERROR, logger="broadcaster.scheduler"):
        task = asyncio.create_task(rig.scheduler.run(interval=0))
        for _ in range(100):
            await asyncio.sleep(0)
            if await rig.queued():
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert task.cancelled()
    assert await rig.queued() == [("stars", "schedule:night")]
    assert caplog.text.count("scheduler tick failed") == 1
