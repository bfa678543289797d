"""Containment for the channel's parts: each runs on its own, and a failure stays its own.

`keep_running` restarts a failed part with backoff, `background` keeps a reference to a
fire-and-forget task and reports its failure, `watch_loop_lag` measures how late the event
loop wakes up (a blocking call shows there first). Every failure is counted in
`promptcast_task_failures_total{task}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from broadcaster.backoff import Backoff
from broadcaster.metrics import Metrics

log = logging.getLogger(__name__)

STABLE_S = 60.0  # a run that lasted this long resets the backoff
LAG_INTERVAL_S = 0.5

_background: set[asyncio.Task] = set()  # the event loop keeps only weak references to tasks


class FailureLog:
    """Logs a part's failure with its traceback once, then one line per repeat of the same error."""

    def __init__(self, metrics: Metrics | None):
        self.metrics = metrics
        self._last: dict[str, str] = {}

    def failed(self, task: str, exc: BaseException, then: str = "") -> None:
        """Count and log one failure of `task`."""
        if self.metrics is not None:
            self.metrics.task_failures.labels(task).inc()
        what = f"{type(exc).__name__}: {exc}"
        if self._last.get(task) == what:
            log.error("%s failed again (%s)%s", task, what, then)
        else:
            self._last[task] = what
            log.error("%s failed (%s)%s", task, what, then, exc_info=exc)

    def recovered(self, task: str) -> None:
        """The part works again: its next failure is logged in full."""
        if self._last.pop(task, None) is not None:
            log.info("%s works again", task)


async def keep_running(name: str, run: Callable[[], Awaitable[Any]], failures: FailureLog,
                       backoff: Backoff | None = None) -> None:
    """Await `run()` until it returns; an exception is logged, counted, and `run()` starts again."""
    backoff = backoff or Backoff(1.0, 60.0)
    while True:
        started = time.monotonic()
        try:
            await run()
            return
        except Exception as exc:  # containment is the point: nothing but cancellation passes
            if time.monotonic() - started > STABLE_S:
                backoff.reset()
            delay = backoff.next_delay()
            failures.failed(name, exc, f"; restarting in {delay:.1f}s")
            await asyncio.sleep(delay)


def background(coro: Coroutine[Any, Any, Any], name: str, failures: FailureLog | None = None) -> asyncio.Task:
    """Start a task that nobody awaits, keeping it referenced until done; its failure is reported."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _background.add(task)

    def done(t: asyncio.Task) -> None:
        _background.discard(t)
        if t.cancelled() or t.exception() is None:
            return
        if failures is not None:
            failures.failed(name, t.exception())
        else:
            log.error("%s failed", name, exc_info=t.exception())

    task.add_done_callback(done)
    return task


class LoopLag:
    """How late a timer fires on the event loop; a blocking call on the loop shows up here."""

    def __init__(self, metrics: Metrics, interval: float = LAG_INTERVAL_S):
        self.metrics = metrics
        self.interval = interval
        self.last = 0.0
        self.worst = 0.0

    async def run(self) -> None:
        """Measure until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval)
            self.last = max(0.0, loop.time() - start - self.interval)
            self.worst = max(self.worst, self.last)
            self.metrics.event_loop_lag.set(self.last)
            self.metrics.event_loop_lag_max.set(self.worst)
