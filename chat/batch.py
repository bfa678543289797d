"""Group commit: calls that arrive while a batch is being written travel together in a later one.

At low load every call is written at once (a batch of one, no timer); under load the calls that pile
up during one round trip to the store share the next round trip, so the cost per call falls as the
load grows and latency stays one or two round trips. A call may bring one item (`submit`) or several
(`submit_many`: they stay together, in order). Each caller gets its results only after the batch that
carried them was written: "acknowledged" always means "stored".

With `max_in_flight` > 1 a second batch may be written while the first is still on its way, so the
store and this process work at the same time. Batches in flight may then finish in any order, so a
call is held back while an earlier call sharing one of its `keys` (a voter) is not written
yet: calls that share a key are written in submission order, the others in any order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(eq=False)
class _Call(Generic[Item, Result]):
    items: Sequence[Item]
    future: asyncio.Future[list[Result]]
    keys: frozenset[Hashable]


class Batcher(Generic[Item, Result]):
    """Collects submitted items and writes them with `write(items) -> results` (same length, same order)."""

    def __init__(self, write: Callable[[list[Item]], Awaitable[list[Result]]], *, max_items: int = 512,
                 max_in_flight: int = 1, keys: Callable[[Item], Iterable[Hashable]] | None = None,
                 overlap_min: int = 8) -> None:
        if max_items < 1 or max_in_flight < 1:
            raise ValueError("max_items and max_in_flight must be at least 1")
        if max_in_flight > 1 and keys is None:
            raise ValueError("batches in flight together need `keys` to keep related items in order")
        self._write = write
        self._max_items = max_items  # a batch takes no further call once it holds this many items
        self._max_in_flight = max_in_flight
        self._keys = keys if max_in_flight > 1 else None
        self._overlap_min = overlap_min  # a batch beside one in flight waits for this many items
        self._pending: list[_Call[Item, Result]] = []
        self._pending_items = 0
        self._flights: dict[asyncio.Task[None], frozenset[Hashable]] = {}  # batch task -> its keys
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # batches written (for benchmarks and tests)
        self.items = 0  # items written

    async def submit(self, item: Item) -> Result:
        """Queue `item` for a batch; its result once that batch was written (or the store's error)."""
        return (await self.submit_many((item,)))[0]

    async def submit_many(self, items: Sequence[Item]) -> list[Result]:
        """Queue `items` (written together, in order); their results once written (or the store's error)."""
        if not items:
            return []
        keys: frozenset[Hashable] = frozenset()
        if self._keys is not None:
            keys = frozenset(key for item in items for key in self._keys(item))
        call: _Call[Item, Result] = _Call(items, asyncio.get_running_loop().create_future(), keys)
        self._pending.append(call)
        self._pending_items += len(items)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="store-batch")
        return await call.future

    async def _run(self) -> None:
        try:
            while self._pending or self._flights:
                self._wake.clear()
                if self._ready():
                    await asyncio.sleep(0)  # one turn of the loop: callers that are ready now join
                    batch, keys = self._take()
                    if batch:
                        flight = asyncio.create_task(self._flush(batch), name="store-batch-write")
                        self._flights[flight] = keys
                        flight.add_done_callback(self._landed)
                        continue
                await self._wake.wait()
        finally:
            self._task = None
            for flight in list(self._flights):
                flight.cancel()
            for call in self._pending:  # only left behind when this task itself was cancelled
                call.future.cancel()
            self._pending.clear()
            self._pending_items = 0

    def _ready(self) -> bool:
        if not self._pending or len(self._flights) >= self._max_in_flight:
            return False
        return not self._flights or self._pending_items >= self._overlap_min

    def _landed(self, flight: asyncio.Task[None]) -> None:
        self._flights.pop(flight, None)
        self._wake.set()

    def _take(self) -> tuple[list[_Call[Item, Result]], frozenset[Hashable]]:
        """The next batch, oldest first, leaving behind calls that must wait for one in flight."""
        blocked: set[Hashable] = set().union(*self._flights.values())
        batch: list[_Call[Item, Result]] = []
        held: list[_Call[Item, Result]] = []
        taken: set[Hashable] = set()
        size = 0
        for call in self._pending:
            if call.future.done():  # its caller gave up before it was written
                continue
            if size >= self._max_items or (blocked and not blocked.isdisjoint(call.keys)):
                blocked |= call.keys  # later calls with these keys must not overtake this one
                held.append(call)
                continue
            batch.append(call)
            taken |= call.keys
            size += len(call.items)
        self._pending = held
        self._pending_items = sum(len(call.items) for call in held)
        return batch, frozenset(taken)

    async def _flush(self, batch: list[_Call[Item, Result]]) -> None:
        items = [item for call in batch for item in call.items]
        try:
            results = await self._write(items)
            if len(results) != len(items):
                raise RuntimeError(f"store answered {len(results)} results for {len(items)} items")
        except asyncio.CancelledError:
            for call in batch:
                call.future.cancel()
            raise
        except Exception as exc:  # every caller of the batch sees the store's error
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(exc)
            return
        self.batches += 1
        self.items += len(items)
        at = 0
        for call in batch:
            end = at + len(call.items)
            if not call.future.done():  # a caller that gave up: its items were written all the same
                call.future.set_result(results[at:end])
            at = end
