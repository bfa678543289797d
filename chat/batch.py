"""Group commit: calls that arrive while a batch is being written travel together in a later one.

At low load every call is written at once (a batch of one, no timer); under load the calls that pile
up during one round trip to the store share the next round trip, so the cost per call falls as the
load grows and latency stays one or two round trips. Each caller gets its own result only after the
batch that carried it was written: "acknowledged" always means "stored".

With `max_in_flight` > 1 a second batch may be written while the first is still on its way, so the
store and this process work at the same time. Batches in flight may then finish in any order, so an
item is held back while an earlier item with one of its `keys` (a user, a message id) is not written
yet: items that share a key are written in submission order, the others in any order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Collects `submit`ted items and writes them with `write(items) -> results` (same length, same order)."""

    def __init__(self, write: Callable[[list[Item]], Awaitable[list[Result]]], *, max_items: int = 512,
                 max_in_flight: int = 1, keys: Callable[[Item], Iterable[Hashable]] | None = None,
                 overlap_min: int = 8) -> None:
        if max_items < 1 or max_in_flight < 1:
            raise ValueError("max_items and max_in_flight must be at least 1")
        if max_in_flight > 1 and keys is None:
            raise ValueError("batches in flight together need `keys` to keep related items in order")
        self._write = write
        self._max_items = max_items
        self._max_in_flight = max_in_flight
        self._keys = keys
        self._overlap_min = overlap_min  # a batch beside one in flight waits for this many items
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flights: dict[asyncio.Task[None], frozenset[Hashable]] = {}  # batch task -> its keys
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # batches written (for benchmarks and tests)
        self.items = 0  # items written

    async def submit(self, item: Item) -> Result:
        """Queue `item` for a batch; its result once that batch was written (or the store's error)."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="store-batch")
        return await future

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
            for _, future in self._pending:  # only left behind when this task itself was cancelled
                future.cancel()
            self._pending.clear()

    def _ready(self) -> bool:
        if not self._pending or len(self._flights) >= self._max_in_flight:
            return False
        return not self._flights or len(self._pending) >= self._overlap_min

    def _landed(self, flight: asyncio.Task[None]) -> None:
        self._flights.pop(flight, None)
        self._wake.set()

    def _take(self) -> tuple[list[tuple[Item, asyncio.Future[Result]]], frozenset[Hashable]]:
        """The next batch, oldest first, leaving behind items that must wait for one in flight."""
        if self._keys is None:
            batch = [(i, f) for i, f in self._pending[: self._max_items] if not f.done()]
            del self._pending[: self._max_items]
            return batch, frozenset()
        blocked: set[Hashable] = set().union(*self._flights.values())
        batch, held, taken = [], [], set()
        for index, (item, future) in enumerate(self._pending):
            if len(batch) >= self._max_items:
                held.extend(self._pending[index:])
                break
            if future.done():  # its caller gave up before it was written
                continue
            keys = set(self._keys(item))
            if keys & blocked:
                blocked |= keys  # later items with these keys must not overtake this one
                held.append((item, future))
            else:
                batch.append((item, future))
                taken |= keys
        self._pending = held
        return batch, frozenset(taken)

    async def _flush(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._write([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"store answered {len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # every caller of the batch sees the store's error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self.batches += 1
        self.items += len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # a caller that gave up: its item was written all the same
                future.set_result(result)
