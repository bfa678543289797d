"""The group-commit batcher the steering intake writes through (chat/batch.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from chat.batch import Batcher


class Ledger:
    """A store stand-in that writes batches to a list, taking `delay` seconds per batch."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.batches: list[list[tuple[str, str]]] = []
        self.written: list[tuple[str, str]] = []  # in the order the writes completed

    async def write(self, items: list[tuple[str, str]]) -> list[str]:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay * random.random())  # batches in flight land in any order
        if self.fail_on is not None and any(self.fail_on == text for _, text in items):
            raise ConnectionError("store down")
        self.written.extend(items)
        return [f"stored {text}" for _, text in items]


def by_user(item: tuple[str, str]) -> tuple[str]:
    return (item[0],)


async def test_a_lone_item_is_written_at_once() -> None:
    ledger = Ledger()
    batcher = Batcher(ledger.write)
    async with asyncio.timeout(0.5):
        assert await batcher.submit(("alice", "hello")) == "stored hello"
    assert ledger.batches == [[("alice", "hello")]]


async def test_items_arriving_together_share_one_write() -> None:
    ledger = Ledger(delay=0.01)
    batcher = Batcher(ledger.write)
    results = await asyncio.gather(*(batcher.submit((f"u{i}", f"m{i}")) for i in range(300)))
    assert results == [f"stored m{i}" for i in range(300)]
    assert len(ledger.batches) == 1
    assert (batcher.batches, batcher.items) == (1, 300)


async def test_a_batch_never_exceeds_max_items() -> None:
    ledger = Ledger()
    batcher = Batcher(ledger.write, max_items=64)
    await asyncio.gather(*(batcher.submit((f"u{i}", f"m{i}")) for i in range(200)))
    assert [len(b) for b in ledger.batches] == [64, 64, 64, 8]


async def test_items_that_arrive_during_a_write_go_in_the_next_batch() -> None:
    ledger = Ledger(delay=0.02)
    batcher = Batcher(ledger.write)
    first = asyncio.create_task(batcher.submit(("alice", "first")))
    await asyncio.sleep(0.005)  # the first batch is on its way
    later = await asyncio.gather(*(batcher.submit((f"u{i}", f"later {i}")) for i in range(10)))
    await first
    assert len(later) == 10
    assert [len(b) for b in ledger.batches] == [1, 10]


async def test_a_failed_write_fails_every_caller_of_that_batch_only() -> None:
    ledger = Ledger(delay=0.01, fail_on="poison")
    batcher = Batcher(ledger.write)
    doomed = await asyncio.gather(batcher.submit(("a", "fine")), batcher.submit(("b", "poison")),
                                  return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in doomed)
    assert await batcher.submit(("c", "after")) == "stored after"  # the batcher carries on


async def test_a_caller_that_gives_up_before_the_write_is_left_out() -> None:
    ledger = Ledger(delay=0.02)
    batcher = Batcher(ledger.write)
    first = asyncio.create_task(batcher.submit(("a", "first")))
    await asyncio.sleep(0.005)
    impatient = asyncio.create_task(batcher.submit(("b", "impatient")))
    patient = asyncio.create_task(batcher.submit(("c", "patient")))
    await asyncio.sleep(0)
    impatient.cancel()
    assert await patient == "stored patient"
    await first
    assert [text for _, text in ledger.written] == ["first", "patient"]


@pytest.mark.parametrize("in_flight", [1, 2, 4])
async def test_items_with_a_common_key_are_written_in_submission_order(in_flight: int) -> None:
    ledger = Ledger(delay=0.004)
    batcher = Batcher(ledger.write, max_items=16, max_in_flight=in_flight, keys=by_user, overlap_min=1)
    rng = random.Random(in_flight)
    plan = [(f"user{rng.randrange(12)}", f"vote {n}") for n in range(600)]

    submitted: list[tuple[str, str]] = []

    async def submit_in_order() -> list[str]:
        tasks = []
        for item in plan:
            submitted.append(item)
            tasks.append(asyncio.create_task(batcher.submit(item)))
            if rng.random() < 0.2:
                await asyncio.sleep(0.001)
        return await asyncio.gather(*tasks)

    results = await submit_in_order()
    assert results == [f"stored {text}" for _, text in plan]
    for user in {u for u, _ in plan}:
        assert [t for u, t in ledger.written if u == user] == [t for u, t in submitted if u == user]
    if in_flight > 1:
        assert max(len(b) for b in ledger.batches) > 1


async def test_two_writes_overlap_when_allowed() -> None:
    active = peak = 0

    async def write(items: list[str]) -> list[str]:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        return items

    batcher = Batcher(write, max_items=8, max_in_flight=2, keys=lambda item: (item,), overlap_min=1)
    await asyncio.gather(*(batcher.submit(f"m{i}") for i in range(64)))
    assert peak == 2


def test_overlapping_writes_need_keys() -> None:
    async def write(items: list[str]) -> list[str]:
        return items

    with pytest.raises(ValueError, match="keys"):
        Batcher(write, max_in_flight=2)
