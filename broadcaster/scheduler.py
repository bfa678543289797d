"""The scheduler: plays the programme through steering, on an injected clock.

    every tick: Programme.at(now) -> Slot
      -> steering.set_policy(chat allowed, mode)       the window's chat policy
      -> on_boundary(slot) where the window changes    the lead wires an engine soft re-anchor
      -> autopilot: a new item -> steering.enqueue_direct(prompt, "schedule:<window>")

The autopilot plays the programme where chat may not steer, and where it may once chat has
been quiet for `autopilot.idle_seconds` with nothing of chat's waiting in the queue; it
yields as soon as chat acts. Semantics in docs/schedule.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from datetime import datetime

from broadcaster.metrics import Metrics
from broadcaster.schedule import Clock, Programme, ScheduleSettings, Slot
from chat.events import QueuedPrompt
from chat.steering import Steering

log = logging.getLogger(__name__)

SCHEDULE = "schedule:"  # prefix of `chosen_by` for the programme's prompts (not chat activity)
_UNSET = object()


class Scheduler:
    """The programme at runtime: chat policy per window, boundaries, and the autopilot."""

    def __init__(self, settings: ScheduleSettings, steering: Steering, clock: Clock,
                 on_boundary: Callable[[Slot], None] = lambda slot: None, default_mode: str | None = None,
                 metrics: Metrics | None = None):
        """`default_mode` is the mode of windows that set none (default: chat.mode of `steering`)."""
        self.metrics = metrics
        self.settings = settings
        self.programme = Programme(settings)
        self.steering = steering
        self.clock = clock
        self.on_boundary = on_boundary
        self.default_mode = default_mode or steering.settings.mode
        self.slot: Slot | None = None  # as of the last tick
        self.autopilot = "off"  # off (nothing to play), chat (chat has the channel), waiting, playing
        self._window_key: Hashable | object | None = _UNSET
        self._issued: Hashable | None = None  # item_key of the last prompt the autopilot queued
        self._last_error = ""

    @property
    def engaged(self) -> bool:
        """Whether the autopilot plays the programme now (as of the last tick)."""
        return self.autopilot == "playing"

    def replace(self, settings: ScheduleSettings) -> None:
        """Swap the programme (a reload); the next tick applies it, and a changed current item plays."""
        self.settings = settings
        self.programme = Programme(settings)
        log.info("schedule replaced: %d window(s), %d playlist(s), default %s", len(settings.windows),
                 len(settings.playlists), settings.default_playlist or "none")

    async def tick(self) -> Slot:
        """One decision at the clock's now; returns the slot it acted on."""
        now = self.clock.now()
        slot = self.programme.at(now)
        self.slot = slot
        self.steering.set_policy(slot.chat, slot.mode or self.default_mode)
        if slot.window_key != self._window_key:
            first = self._window_key is _UNSET
            self._window_key = slot.window_key
            if not first:  # starting up is not a boundary: the engine has just started its prompt
                log.info("programme: now %s (playlist %s)", slot.window or "default", slot.playlist or "none")
                if self.settings.reanchor_on_boundary:
                    self._boundary(slot)
        self.autopilot = await self._decide(slot, now)
        if self.metrics is not None:
            self.metrics.autopilot_engaged.set(1 if self.autopilot == "playing" else 0)
            self.metrics.chat_steering_enabled.set(1 if slot.chat else 0)
        if self.autopilot == "playing" and slot.item_key != self._issued:
            await self._drop_stale()
            await self.steering.enqueue_direct(slot.prompt, chosen_by=f"{SCHEDULE}{slot.window or 'default'}")
            self._issued = slot.item_key
            log.info("autopilot: %s", slot.prompt)
        return slot

    def _boundary(self, slot: Slot) -> None:
        try:
            self.on_boundary(slot)
        except Exception:
            # A failed re-anchor must not keep the next item off the air.
            log.exception("on_boundary failed at %s", slot.window or "default")

    async def _decide(self, slot: Slot, now: datetime) -> str:
        if slot.prompt is None:
            self._issued = None
            return "off"
        autopilot = self.settings.autopilot
        if slot.chat and (not autopilot.enabled or self.idle_seconds(now) < autopilot.idle_seconds):
            self._issued = None  # when chat goes quiet again, the current item plays again
            return "chat"
        if any(not entry.chosen_by.startswith(SCHEDULE) for entry in await self._queued()):
            # What chat or a moderator queued plays first; the programme goes on with its next item.
            return "waiting"
        return "playing"

    async def _queued(self) -> list[QueuedPrompt]:
        store = self.steering.store
        depth = await store.queue_depth()
        return await store.queued(limit=depth) if depth else []

    async def _drop_stale(self) -> None:
        # A programme prompt still waiting (steering paused, engine slow) is out of date now: one at
        # a time is ever queued, so a paused channel does not pile them up.
        for entry in await self._queued():
            if entry.chosen_by.startswith(SCHEDULE):
                await self.steering.store.ack(entry.entry_id)

    def idle_seconds(self, now: datetime | None = None) -> float:
        """Seconds since chat's last accepted suggestion, vote or moderator queueing."""
        now = now or self.clock.now()
        return now.timestamp() - self.steering.last_activity

    async def run(self, interval: float = 0.5) -> None:
        """Tick every `interval` seconds until cancelled; errors are logged and the next tick retries."""
        while True:
            try:
                await self.tick()
                self._last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if repr(exc) != self._last_error:  # once per distinct error, not twice a second
                    log.exception("scheduler tick failed; retrying")
                self._last_error = repr(exc)
            await asyncio.sleep(interval)

    def status(self) -> dict:
        """Window, playlist, prompt, autopilot, chat policy and the next boundary — for the API."""
        now = self.clock.now()
        slot = self.programme.at(now)
        boundary = self.programme.next_change(now)
        return {
            "timezone": self.settings.timezone,
            "window": slot.window,
            "playlist": slot.playlist,
            "prompt": slot.prompt,
            "item_index": slot.item_index,
            "item_ends_at": slot.ends_at.isoformat() if slot.ends_at else None,
            "autopilot": self.engaged,
            "autopilot_state": self.autopilot,
            "autopilot_enabled": self.settings.autopilot.enabled,
            "chat_idle_seconds": round(self.idle_seconds(now), 1),
            "chat": slot.chat,
            "mode": slot.mode or self.default_mode,
            "next_boundary": boundary.isoformat() if boundary else None,
            "seconds_to_boundary": (boundary - now).total_seconds() if boundary else None,
        }
