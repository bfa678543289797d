"""An engine supervisor on a small preview engine, with a thread draining the ring like the pacer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from broadcaster.metrics import Metrics
from broadcaster.supervisor import EngineSupervisor
from broadcaster.switches import SwitchTracker
from engine.ring import FrameRing
from engine.settings import EngineSettings


@contextmanager
def supervised_preview(settings: EngineSettings,
                       backend: str = "preview") -> Iterator[tuple[EngineSupervisor, Metrics]]:
    """A supervisor over an engine (preview unless told); frames are read and dropped (a full ring waits)."""
    ring = FrameRing.create(settings.width, settings.height, 24)
    metrics = Metrics()
    supervisor = EngineSupervisor(settings, backend, ring, metrics, SwitchTracker(metrics))
    stop = threading.Event()

    def drain() -> None:
        out = np.empty((settings.height, settings.width, 3), np.uint8)
        while not stop.is_set():
            if ring.read_into(out) is None:
                stop.wait(0.002)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield supervisor, metrics
    finally:
        stop.set()
        reader.join()
        ring.close()


def run_supervised(supervisor: EngineSupervisor, scenario: Callable[[], Awaitable[Any]]) -> Any:
    """Run the supervisor while `scenario()` acts on it; close it afterwards and return what it returned."""

    async def main() -> Any:
        task = asyncio.create_task(supervisor.run())
        try:
            return await scenario()
        finally:
            await supervisor.close()
            await asyncio.wait_for(task, 15)

    return asyncio.run(main())


async def until(predicate: Callable[[], Any], timeout: float = 20) -> None:
    """Wait on the event loop until `predicate()` is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def metric_values(metrics: Metrics) -> dict[str, float]:
    """Every sample of the registry by name."""
    return {s.name: s.value for m in metrics.registry.collect() for s in m.samples}
