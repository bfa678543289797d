"""The running channel: engine supervisor, pacer, outputs and HTTP server, with their lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from broadcaster.api_token import api_token
from broadcaster.connections import ConnectionCap, fd_status, quiet_accept_errors
from broadcaster.encoder import StreamEncoder
from broadcaster.health import HealthVerdict
from broadcaster.http import make_app
from broadcaster.metrics import Metrics
from broadcaster.outputs.factory import build_outputs
from broadcaster.pacer import Pacer
from broadcaster.schedule import SystemClock
from broadcaster.scheduler import Scheduler
from broadcaster.settings import ConfigError, HlsOutputSettings, Settings, load_settings, output_name
from broadcaster.steering_runtime import SteeringRuntime, open_store
from broadcaster.supervisor import EngineSupervisor
from broadcaster.switches import SwitchTracker
from broadcaster.tasks import FailureLog, LoopLag, background, keep_running
from broadcaster.webrtc import WhepHub
from engine.backends import choose_backend
from engine.ring import FrameRing

log = logging.getLogger(__name__)

PACER_STALL_S = 2.0
GOP_FINISH_TIMEOUT_S = 12.0  # longer than the longest GOP (keyframe_seconds <= 10)


class Service:
    """One channel, from engine process to outputs."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, config_path: str | None = None):
        self.settings = settings
        self.config_path = config_path  # re-read for the schedule on SIGHUP or POST /api/schedule/reload
        self.scheduler: Scheduler | None = None
        self.metrics = metrics or Metrics()
        self.switches = SwitchTracker(self.metrics)
        self._stop = asyncio.Event()
        self.supervisor: EngineSupervisor | None = None
        self.pacer: Pacer | None = None
        self.outputs: list = []
        self.http_port: int | None = None
        self.store = None
        self.steering: SteeringRuntime | None = None
        self.whep: WhepHub | None = None
        self.failures = FailureLog(self.metrics)
        self.connections: ConnectionCap | None = None
        self._verdict = HealthVerdict()
        self.loop_lag = LoopLag(self.metrics)

    def request_stop(self) -> None:
        """Begin a graceful shutdown."""
        self._stop.set()

    def health(self) -> tuple[bool, dict]:
        """Liveness (the output clock ticks) and every part's status, with why it is degraded."""
        pacer = self.pacer.status() if self.pacer else {}
        ok = bool(pacer) and pacer["last_tick_age_s"] < PACER_STALL_S
        parts = {
            "channel": self.settings.channel,
            "pacer": pacer,
            "engine": self.supervisor.status() if self.supervisor else {},
            "outputs": {o.name: o.status() for o in self.outputs},
            "whep": self.whep.status() if self.whep else {},
            "chat": self.steering.status() if self.steering else {},
            "schedule": self.schedule_status(),
            "process": {**fd_status(), "event_loop_lag_s": round(self.loop_lag.last, 4),
                        "event_loop_lag_max_s": round(self.loop_lag.worst, 4),
                        "http_connections": self.connections.open if self.connections else None},
        }
        parts["degraded"] = self._verdict.reasons(parts)
        return ok, parts

    async def state(self) -> dict:
        """What is on air and how chat is steering it, for the control API."""
        sup = self.supervisor
        return {
            "steering": await self.steering.state() if self.steering else None,
            "channel": self.settings.channel,
            "prompt_on_air": self.switches.on_air_prompt,
            "prompt_on_air_seq": self.switches.on_air_seq,
            "prompt_requested": sup.prompt if sup else None,
            "prompt_requested_seq": sup.prompt_seq if sup else None,
            "last_switch_latency_s": self.switches.last_latency,
            "engine": sup.status() if sup else {},
        }

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT or `request_stop()`, then shut down cleanly."""
        s = self.settings
        token = api_token(s)  # before anything starts: a channel without a usable token never opens
        backend, reason = choose_backend(s.engine)
        log.info("engine backend: %s (%s)", backend, reason)
        width, height = s.output_size
        encoder = StreamEncoder(s.encoder, width, height, s.output_fps)
        ring = FrameRing.create(s.engine.width, s.engine.height, s.engine.ring_frames)
        runner: web.AppRunner | None = None
        try:
            self.outputs = build_outputs(s, encoder, self.metrics)
            self.whep = WhepHub(s.server, encoder, self.metrics)
            self.supervisor = EngineSupervisor(s.engine, backend, ring, self.metrics, self.switches)
            self.store = open_store(s.store, s.channel)
            self.steering = SteeringRuntime(s.chat, self.store, self.supervisor, self.switches, self.metrics)
            self.scheduler = Scheduler(s.schedule, self.steering.steering, SystemClock(),
                                       on_boundary=self._schedule_boundary, metrics=self.metrics)
            self.pacer = Pacer(ring, encoder, [o.submit for o in self.outputs] + [self.whep.submit],
                               self.metrics, self.switches, s.engine.fps)
            hls = next((o for o in s.outputs if isinstance(o, HlsOutputSettings)), None)
            app = make_app(metrics=self.metrics, health=self.health, state=self.state,
                           steering=self.steering, api_token=token,
                           hls_dir=hls.dir if hls else None, cors_origins=s.server.cors_origins,
                           operations=self, events_per_client=s.server.events_per_client)
            self.pacer.frame_sinks += [o.submit_frame for o in self.outputs if hasattr(o, "submit_frame")]
            self.steering.aired += [o.timeline.aired for o in self.outputs if getattr(o, "timeline", None)]
            self.whep.add_routes(app)  # POST /whep, PATCH/DELETE /whep/<id>
            # keepalive_timeout also closes a connection that never completes its request headers.
            runner = web.AppRunner(app, access_log=None, keepalive_timeout=s.server.idle_timeout_s)
            await runner.setup()
            self.connections = ConnectionCap(runner.server, s.server.max_connections, self.metrics)
            quiet_accept_errors()
            site = web.TCPSite(runner, s.server.host, s.server.port)
            await site.start()
            self.http_port = runner.addresses[0][1]
            log.info("channel %s: http://%s:%d/ (health /healthz, metrics /metrics); outputs: %s",
                     s.channel, s.server.host, self.http_port,
                     ", ".join(f"{output_name(o, i)}" for i, o in enumerate(s.outputs)) or "none")
            self._install_signal_handlers()
            await self._run_parts()
        finally:
            if runner is not None:
                await runner.cleanup()
            if self.store is not None:
                await self.store.close()
            encoder.close()
            ring.close()
            log.info("channel %s stopped", s.channel)

    async def _run_parts(self) -> None:
        assert self.pacer and self.supervisor
        async with asyncio.TaskGroup() as group:
            def part(name: str, run) -> asyncio.Task:
                # Supervised on its own: an exception is logged, counted and retried here, so it
                # never reaches the group (which would stop every other part with it).
                return group.create_task(keep_running(name, run, self.failures), name=name)

            part("engine-supervisor", self.supervisor.run)
            steering = part("steering", self.steering.run)
            schedule = part("schedule", self.scheduler.run)
            for output in self.outputs:
                part(f"output-{output.name}", output.run)
            lag = group.create_task(self.loop_lag.run(), name="loop-lag")
            pacer_done = group.create_task(asyncio.to_thread(self.pacer.run), name="pacer")
            try:
                await self._stop.wait()
                log.info("shutting down: chat stopped; finishing the current GOP, then closing outputs")
            finally:
                # Order matters. Stop taking chat: queued prompts not yet on air stay unacknowledged
                # (in Redis they play after the restart). Then end every output on a complete GOP,
                # and only then let each muxer write its trailer.
                schedule.cancel()
                steering.cancel()
                lag.cancel()
                self.pacer.stop(finish_gop=True)
                try:
                    await asyncio.wait_for(asyncio.shield(pacer_done), GOP_FINISH_TIMEOUT_S)
                except TimeoutError:
                    log.warning("the output clock did not reach the end of its GOP; stopping it now")
                    self.pacer.stop()
                    await asyncio.shield(pacer_done)
                for output in self.outputs:
                    await output.close()
                await self.supervisor.close()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Off the main thread (embedded use) there are no signal handlers; stop is explicit.
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)

    def _reload_on_signal(self) -> None:
        background(self.reload_schedule(), "schedule-reload", self.failures)

    # --- operations (the control API and signals) -----------------------------------------------
    def _schedule_boundary(self, slot) -> None:
        # A new programme window: its first prompt also renews the engine's sink (soft re-anchor).
        if self.steering is not None:
            self.steering.request_reanchor()

    def schedule_status(self) -> dict:
        """The programme now: window, playlist, prompt, autopilot, next boundary."""
        return self.scheduler.status() if self.scheduler else {}

    async def reload_schedule(self) -> tuple[bool, list[str]]:
        """Re-read the channel file and swap in its `schedule:`; the stream goes on. (ok, problems)."""
        if self.config_path is None:
            return False, ["this channel runs the embedded default config: there is no file to re-read"]
        try:
            # Parsed in a thread: a large or hostile file must not hold up the event loop (/healthz).
            fresh = await asyncio.to_thread(load_settings, self.config_path)
        except ConfigError as exc:
            problems = [str(p) for p in exc.problems]
            log.error("schedule reload refused, the running programme stays: %s", "; ".join(problems))
            return False, problems
        if self.scheduler is not None:
            self.scheduler.replace(fresh.schedule)
        self.settings = self.settings.model_copy(update={"schedule": fresh.schedule})
        changed = [name for name in Settings.model_fields
                   if name != "schedule" and getattr(fresh, name) != getattr(self.settings, name)]
        log.info("schedule reloaded from %s", self.config_path)
        if changed:
            log.warning("%s changed in %s too: those take effect at the next restart", ", ".join(changed),
                        self.config_path)
        return True, []

    def reanchor(self) -> None:
        """Renew the engine's attention sink from recent frames at the next block (no cut)."""
        if self.supervisor is not None:
            self.supervisor.reanchor()
