"""Keeps the engine process alive: start, watch its heartbeat, restart with backoff, report crash loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import time
from collections import deque

from broadcaster.backoff import Backoff
from broadcaster.metrics import Metrics
from broadcaster.switches import SwitchTracker
from engine.process import EngineSpec, run_engine
from engine.progress import describe
from engine.ring import FrameRing
from engine.settings import EngineSettings

log = logging.getLogger(__name__)

_CTX = mp.get_context("spawn")  # never fork a process that may hold CUDA
STABLE_SECONDS = 60.0  # an engine up this long resets the backoff and ends a crash loop
CRASH_LOOP_RESTARTS = 3  # this many restarts ...
CRASH_LOOP_WINDOW_S = 300.0  # ... within this many seconds is a crash loop
PHASES = ("loading", "warmup", "compiling", "running")  # an engine's life, each with its own timeout


class CrashLoop:
    """Remembers recent restarts; a burst of them is a crash loop until an engine runs stably."""

    def __init__(self, restarts: int = CRASH_LOOP_RESTARTS, window_s: float = CRASH_LOOP_WINDOW_S):
        self.restarts, self.window_s = restarts, window_s
        self._times: deque[float] = deque()
        self.active = False

    def restarted(self, now: float) -> bool:
        """Count a restart at `now`; True when it starts a crash loop."""
        self._times.append(now)
        entered = not self.active and self.recent(now) >= self.restarts
        self.active = self.active or entered
        return entered

    def recent(self, now: float) -> int:
        """Restarts within the window before `now` (since the last stable run)."""
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()
        return len(self._times)

    def stable(self) -> bool:
        """An engine ran stably: forget past restarts. True when that ends a crash loop."""
        ended, self.active = self.active, False
        self._times.clear()
        return ended


class EngineSupervisor:
    """Runs one engine process at a time and replaces it when it dies or hangs."""

    def __init__(self, settings: EngineSettings, backend: str, ring: FrameRing, metrics: Metrics,
                 switches: SwitchTracker):
        self.settings = settings
        self.backend = backend
        self.ring = ring
        self.metrics = metrics
        self.switches = switches
        self.prompt = settings.prompt
        self.prompt_seq = 0
        self.seed = settings.seed
        self.block = 0
        self.state = "loading"  # loading -> warmup | compiling -> running (docs/broadcaster.md)
        self._phase_since = self._progress_at = self._warmup_started = time.monotonic()
        self.load_progress: dict | None = None
        self.restarts = 0
        self.last_error = ""
        self.process: mp.process.BaseProcess | None = None
        self._control = None
        self._closing = False
        self._backoff = Backoff(0.5, settings.max_restart_backoff_s)
        self._blocks: deque[tuple[float, int]] = deque(maxlen=32)
        self._recaches_seen = 0
        self._reanchors_seen = 0
        self.reanchors = 0  # soft re-anchors over every engine this supervisor ran
        self.drift = 0.0
        self.crash_loop = CrashLoop()
        self._restart_at: float | None = None  # when the pending restart happens (monotonic)
        self.block_done = asyncio.Event()  # set at every block boundary (steering listens)
        switches.decided(0, self.prompt)

    def switch_prompt(self, prompt: str, reanchor: bool = False) -> int:
        """Decide a switch now; the engine applies it at its next block. Returns its sequence number.

        `reanchor` also renews the attention sink there (a schedule boundary), in the same passes.
        """
        self.prompt_seq += 1
        self.prompt = prompt
        self.switches.decided(self.prompt_seq, prompt)
        self._send(("switch", self.prompt_seq, prompt, reanchor))
        log.info("prompt switch #%d decided%s", self.prompt_seq, " with a re-anchor" if reanchor else "")
        return self.prompt_seq

    def reanchor(self) -> None:
        """Ask the engine for a soft re-anchor at its next block (an operator's request)."""
        self._send(("reanchor",))
        log.info("re-anchor requested")

    def prepare_prompt(self, prompt: str) -> None:
        """Ask the engine to get a likely next prompt ready (text encoding) before it is chosen."""
        self._send(("prepare", prompt))

    def _send(self, message) -> None:
        if self._control is not None:
            # If the engine is gone, its successor starts with the current prompt anyway.
            with contextlib.suppress(OSError):
                self._control.send(message)

    async def run(self) -> None:
        """Run engines until `close()`."""
        while not self._closing:
            started = time.monotonic()
            reason = await self._run_once()
            if self._closing:
                break
            now = time.monotonic()
            self.restarts += 1
            self.metrics.engine_restarts.labels(reason).inc()
            if now - started > STABLE_SECONDS:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            if self.crash_loop.restarted(now):
                self.metrics.engine_crash_loop.set(1)
                log.error("engine crash loop: %d restarts within %.0fs, last error: %s; backing off",
                          self.crash_loop.recent(now), self.crash_loop.window_s,
                          self.last_error or "no detail")
            self.state = "crash-loop" if self.crash_loop.active else "restarting"
            log.warning("engine %s (%s); restart #%d in %.2fs", reason, self.last_error or "no detail",
                        self.restarts, delay)
            self._restart_at = now + delay
            while not self._closing and time.monotonic() < self._restart_at:
                await asyncio.sleep(0.05)
            self._restart_at = None

    async def _run_once(self) -> str:
        control_read, control_write = _CTX.Pipe(duplex=False)
        events_read, events_write = _CTX.Pipe(duplex=False)
        spec = EngineSpec(self.backend, self.settings, self.ring.name, self.prompt, self.prompt_seq,
                          self.seed, self.block)
        process = _CTX.Process(target=run_engine, args=(spec, control_read, events_write),
                               name="engine", daemon=True)
        process.start()
        control_read.close()
        events_write.close()
        self.process, self._control = process, control_write
        self._recaches_seen = self._reanchors_seen = 0  # a new engine counts from zero
        self._enter("loading")
        self.load_progress = None
        running_since = None
        reason = "stopped"
        try:
            while True:
                self._read_events(events_read)
                now = time.monotonic()
                if self.state == "running" and running_since is None:
                    running_since = now
                if running_since is not None and now - running_since > STABLE_SECONDS:
                    running_since = float("inf")  # checked once per engine
                    if self.crash_loop.stable():
                        self.metrics.engine_crash_loop.set(0)
                        log.info("engine stable for %.0fs: crash loop over", STABLE_SECONDS)
                if not process.is_alive():
                    reason = "crashed"
                    self._read_events(events_read)
                    if not self.last_error:
                        self.last_error = f"exit code {process.exitcode}"
                    break
                if self._closing:
                    await self._stop(process)
                    break
                stall = self.stall(now)
                if stall is not None:
                    reason = "hung"
                    self.last_error = stall
                    process.kill()
                    break
                await asyncio.sleep(0.05)
            await asyncio.to_thread(process.join, 5)
        finally:
            self._control = None
            self.metrics.engine_up.set(0)
            control_write.close()
            events_read.close()
        return reason

    def _enter(self, phase: str) -> None:
        self.state = phase
        self._phase_since = self._progress_at = time.monotonic()
        for name in PHASES:
            self.metrics.engine_phase.labels(name).set(1 if name == phase else 0)

    def stall(self, now: float) -> str | None:
        """Why the engine counts as hung in its phase, or None (the rules: docs/broadcaster.md)."""
        settings = self.settings
        if self.state == "loading":
            idle = now - self._progress_at
            if idle > settings.startup_timeout_s:
                return f"load stalled: no progress for {idle:.1f}s ({describe(self.load_progress)})"
        elif self.state in ("warmup", "compiling"):
            spent, limit = now - self._phase_since, settings.effective_warmup_timeout_s
            if spent > limit:
                return f"{self.state} not done after {spent:.1f}s (warmup_timeout_s {limit:.0f})"
        elif self.state == "running":
            age = self.ring.heartbeat_age()
            if age > settings.heartbeat_timeout_s:
                return f"no heartbeat for {age:.1f}s"
        return None

    @property
    def phase_detail(self) -> str:
        """What the engine does, for people: 'loading weights 7.2 / 14.1 GB (...)', 'running'..."""
        if self.state == "loading":
            return describe(self.load_progress)
        if self.state in ("warmup", "compiling"):
            what = "compiling the DiT and making the first block" if self.state == "compiling" else \
                "making the first block"
            return f"{what} ({time.monotonic() - self._phase_since:.0f}s)"
        return self.state

    async def _stop(self, process) -> None:
        self._send(("stop",))
        await asyncio.to_thread(process.join, 5)
        if process.is_alive():
            process.kill()

    def _read_events(self, conn) -> None:
        try:
            while conn.poll():
                event = conn.recv()
                kind = event[0]
                if kind == "phase":
                    self._phase_event(event[1], event[2])
                elif kind == "ready":
                    self.last_error = ""
                    log.info("engine ready: %s pid %d; first block under way", event[1]["backend"],
                             event[1]["pid"])
                elif kind == "block":
                    if self.state != "running":
                        self._enter("running")
                        self.metrics.engine_up.set(1)
                        log.info("engine running: first block after %.1fs of warm-up",
                                 time.monotonic() - self._warmup_started)
                    self.block_done.set()
                    self.block = event[1]
                    self.metrics.frames_generated.inc(event[2])
                    if event[3] > self._recaches_seen:
                        self.metrics.recaches.inc(event[3] - self._recaches_seen)
                    self._recaches_seen = event[3]
                    if event[4] > self._reanchors_seen:
                        self.reanchors += event[4] - self._reanchors_seen
                        self.metrics.reanchors.inc(event[4] - self._reanchors_seen)
                        log.info("re-anchor #%d at block %d", self.reanchors, event[1])
                    self._reanchors_seen = event[4]
                    self.drift = event[5]
                    self.metrics.engine_drift.set(event[5])
                    self._blocks.append((time.monotonic(), event[2]))
                    self.metrics.generation_fps.set(self.generation_fps)
                elif kind == "applied":
                    log.info("prompt switch #%d applied at block %d", event[1], event[2])
                elif kind == "error":
                    self.last_error = event[1]
                    log.error("engine failed: %s\n%s", event[1], event[2])
        except (EOFError, OSError):
            pass

    def _phase_event(self, phase: str, info: dict | None) -> None:
        if phase == "loading":
            self._progress_at = time.monotonic()  # any report, even a repeated one, is progress
            if info is not None:
                self.load_progress = info
                self.metrics.engine_load_bytes.set(info["bytes"])
            return
        self._warmup_started = time.monotonic()
        seconds = (info or {}).get("load_seconds")
        log.info("engine loaded%s; %s (limit %.0fs)", f" in {seconds:.1f}s" if seconds is not None else "",
                 "compiling" if phase == "compiling" else "warming up",
                 self.settings.effective_warmup_timeout_s)
        self._enter(phase)

    @property
    def generation_fps(self) -> float:
        """Frames per second the engine delivered over its last blocks."""
        if len(self._blocks) < 2:
            return 0.0
        span = self._blocks[-1][0] - self._blocks[0][0]
        frames = sum(n for _, n in list(self._blocks)[1:])
        return frames / span if span > 0 else 0.0

    def status(self) -> dict:
        """Status for /healthz."""
        alive = self.process is not None and self.process.is_alive()
        now = time.monotonic()
        return {
            "backend": self.backend,
            "state": self.state,
            "phase": self.phase_detail,
            "phase_seconds": round(now - self._phase_since, 1),
            "load_progress": self.load_progress,
            "pid": self.process.pid if alive else None,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "block": self.block,
            "prompt": self.prompt,
            "prompt_seq": self.prompt_seq,
            "generation_fps": round(self.generation_fps, 2),
            "heartbeat_age_s": round(self.ring.heartbeat_age(), 2) if alive else None,
            "crash_loop": self.crash_loop.active,
            "restarts_recent": self.crash_loop.recent(now),
            "next_restart_in_s": (round(max(0.0, self._restart_at - now), 2)
                                  if self._restart_at is not None else None),
            "reanchors": self.reanchors,
            "drift": round(self.drift, 4),
        }

    async def close(self) -> None:
        """Stop the engine; `run()` returns."""
        self._closing = True
