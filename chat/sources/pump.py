"""How a source hands its queued events to the steering core: in arrival order, several at once.

Each event waits for its store write, and the steering core writes what is in flight together (one
Redis round trip per batch), so keeping several in flight is what lets a busy chat share round trips.
With an emit that takes many (`Delivery`), what has piled up in the queue goes in one call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from chat.events import ChatEvent
from chat.sources.base import Emit

log = logging.getLogger(__name__)


class Pump:
    """Takes events off `queue` and emits them until cancelled (then in-flight emits are cancelled)."""

    def __init__(self, queue: asyncio.Queue[ChatEvent], emit: Emit, *, concurrency: int = 64,
                 many_max: int = 256, many_in_flight: int = 4,
                 counted: Callable[[ChatEvent], None] = lambda event: None) -> None:
        self._queue = queue
        self._emit = emit
        self._many = getattr(emit, "many", None)
        # one event per call: `concurrency` calls at once; many per call: `many_in_flight` calls
        self._slots = asyncio.Semaphore(max(1, concurrency if self._many is None else many_in_flight))
        self._many_max = max(1, many_max)
        self._counted = counted

    async def run(self) -> None:
        """Until cancelled."""
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                events = [await self._queue.get()]
                while self._many is not None and len(events) < self._many_max and not self._queue.empty():
                    events.append(self._queue.get_nowait())
                for event in events:
                    self._counted(event)
                await self._slots.acquire()
                work = self._many(events) if self._many is not None else self._emit(events[0])
                task = asyncio.create_task(self._deliver(work, events), name="chat-emit")
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:
            for task in in_flight:
                task.cancel()

    async def _deliver(self, work: Awaitable[Any], events: list[ChatEvent]) -> None:
        try:
            await work
        except Exception:  # a consumer bug must not stop the source
            log.exception("emit failed for %d event(s) from message %s", len(events), events[0].message_id)
        finally:
            self._slots.release()
