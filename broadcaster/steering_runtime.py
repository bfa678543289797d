"""Wires chat steering to the engine: sources -> Steering -> prompt switches at block boundaries."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from broadcaster.metrics import Metrics
from broadcaster.source_metrics import SourceCollector
from broadcaster.supervisor import EngineSupervisor
from broadcaster.switches import OnAir, SwitchTracker
from broadcaster.tasks import FailureLog, background, keep_running
from broadcaster.timeline import Aired
from chat.events import ChatEvent, QueuedPrompt
from chat.settings import ChatSettings, LocalSourceSettings, StoreSettings
from chat.sources.base import ChatSource, Delivery
from chat.sources.local import LocalSource
from chat.steering import Steering, SteeringHooks
from chat.store import SteeringStore

log = logging.getLogger(__name__)

TICK_S = 0.25
STORE_PROBE_S = 2.0  # how often /healthz's view of the store is refreshed
REANCHOR_WAIT_S = 3.0  # a boundary's re-anchor rides on the programme's switch if one comes this soon


def open_store(settings: StoreSettings, channel: str) -> SteeringStore:
    """The configured store: in-process memory, or Redis under the channel's key prefix."""
    if settings.kind == "redis":
        from chat.redis_store import RedisStore

        return RedisStore(settings.url, channel, max_connections=settings.max_connections)
    from chat.memory_store import MemoryStore

    return MemoryStore()


def build_sources(settings: ChatSettings) -> list[ChatSource]:
    """One source per configured entry; a local source always exists (the API feeds it)."""
    sources: list[ChatSource] = []
    for entry in settings.sources:
        if isinstance(entry, LocalSourceSettings):
            sources.append(LocalSource())
        else:
            from chat.sources.twitch import TwitchSource

            sources.append(TwitchSource(entry))
    if not any(isinstance(s, LocalSource) for s in sources):
        sources.append(LocalSource())
    return sources


class SteeringRuntime:
    """Runs the sources, the round clock and the switch loop for one channel."""

    def __init__(self, settings: ChatSettings, store: SteeringStore, supervisor: EngineSupervisor,
                 switches: SwitchTracker, metrics: Metrics, sources: list[ChatSource] | None = None):
        self.store = store
        self.supervisor = supervisor
        self.sources = sources if sources is not None else build_sources(settings)
        self.local = next(s for s in self.sources if isinstance(s, LocalSource))
        by_name = {s.name: s for s in self.sources}

        async def reply(event: ChatEvent, text: str) -> None:
            source = by_name.get(event.source)
            if source is not None:
                await source.reply(text, event)

        async def refund(event: ChatEvent) -> None:
            source = by_name.get(event.source)
            if source is not None:
                await source.refund(event)

        async def fulfill(event: ChatEvent) -> None:
            done = getattr(by_name.get(event.source), "fulfill", None)  # only Twitch has redemptions
            if done is not None:
                await done(event)

        async def announce(text: str) -> None:
            for source in self.sources:
                await source.reply(text, None)

        async def automod(event: ChatEvent, text: str) -> bool:
            check = getattr(by_name.get(event.source), "automod_permitted", None)
            return True if check is None else await check(event, text)  # only Twitch has AutoMod

        hooks = SteeringHooks(
            message=lambda source: metrics.chat_messages.labels(source).inc(),
            rejected=lambda reason: metrics.prompts_rejected.labels(reason).inc(),
            vote=metrics.votes.inc,
            queue_depth=metrics.queue_depth.set,
            reply=reply,
            refund=refund,
            fulfill=fulfill,
            prepare=supervisor.prepare_prompt,
            queued=self.wake,
            announce=announce,
            automod=automod,
        )
        self.steering = Steering(settings, store, hooks=hooks)
        metrics.registry.register(SourceCollector(self.sources))  # promptcast_chat_source_*
        self.failures = FailureLog(metrics)
        self.store_reachable = True
        self.store_error = ""
        self._in_flight: dict[int, QueuedPrompt] = {}  # switch seq -> queued entry not yet on air
        try:  # known from the start, so the very first frame's on-air event is not missed
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._reanchor_since: float | None = None  # a re-anchor asked for (schedule boundary), not yet sent
        self.aired: list[Callable[[Aired], None]] = []  # told on the event loop when a prompt reaches the air
        switches.listeners.append(self._on_air_from_pacer)
        self._wake = asyncio.Event()  # a prompt was queued or reached the air: look at the queue now

    def _on_air_from_pacer(self, event: OnAir) -> None:
        # Called in the pacer thread: hop onto the event loop.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._acknowledge, event)

    def wake(self) -> None:
        """Look at the queue now rather than at the next block boundary (a prompt was queued, a skip)."""
        self._wake.set()

    def _acknowledge(self, event: OnAir) -> None:
        self._wake.set()  # the next queued prompt may go as soon as this one is on air
        prompt = self._in_flight.pop(event.seq, None)
        if prompt is not None:
            # Referenced until done, and a failure is logged and counted (the entry replays after a restart).
            background(self.steering.applied(prompt), "steering-ack", self.failures)
        chosen_by = prompt.chosen_by if prompt is not None else ("start" if event.seq == 0 else "api")
        for listener in self.aired:
            try:
                listener(Aired(event, chosen_by))
            except Exception:  # a timeline that cannot be written must not stop acknowledgements
                log.exception("on-air listener failed")

    async def run(self) -> None:
        """Run until cancelled."""
        self._loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as group:
            for source in self.sources:
                group.create_task(self._run_source(source), name=f"chat-{source.name}")
            group.create_task(self._clock(), name="steering-clock")
            group.create_task(self._probe_store(), name="store-probe")
            group.create_task(self._switch_loop(), name="steering-switch")

    async def _run_source(self, source: ChatSource) -> None:
        async def one(event: ChatEvent) -> None:
            await many((event,))

        async def many(events: Sequence[ChatEvent]) -> None:
            try:
                await self.steering.handle_many(events)
            except Exception:  # one bad batch (or a store hiccup) must not stop the chat
                log.exception("%d chat event(s) from %s could not be handled", len(events), source.name)

        emit = Delivery(one, many)  # a busy source hands over what piled up in one call

        # A source reconnects by itself; this is the last resort (logged as "chat source NAME failed").
        await keep_running(f"chat source {source.name}", lambda: source.run(emit), self.failures)

    async def _probe_store(self) -> None:
        while True:
            try:
                async with asyncio.timeout(STORE_PROBE_S * 2):
                    await self.store.queue_depth()
            except Exception as exc:  # StoreUnavailable, a timeout: /healthz says degraded meanwhile
                if self.store_reachable:
                    log.warning("store unreachable (%s: %s)", type(exc).__name__, exc)
                self.store_reachable, self.store_error = False, f"{type(exc).__name__}: {exc}"
            else:
                if not self.store_reachable:
                    log.info("store reachable again")
                self.store_reachable, self.store_error = True, ""
            await asyncio.sleep(STORE_PROBE_S)

    def status(self) -> dict:
        """Chat sources and the store, for /healthz."""
        return {
            "sources": [source.status() for source in self.sources],
            "store": {"kind": type(self.store).__name__, "reachable": self.store_reachable,
                      "last_error": self.store_error},
        }

    async def _clock(self) -> None:
        while True:
            try:
                await self.steering.tick()
            except Exception:
                log.exception("steering tick failed; retrying")
            await asyncio.sleep(TICK_S)

    async def _switch_loop(self) -> None:
        """Hand the next queued prompt to the engine as soon as it is due (applied at its next block)."""
        # Due: just queued or skipped to (woken), or at a boundary (a minimum play time ran out).
        block_done = self.supervisor.block_done
        while True:
            boundary = asyncio.ensure_future(block_done.wait())
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait((boundary, woken), return_when=asyncio.FIRST_COMPLETED)
            finally:
                boundary.cancel()
                woken.cancel()
            block_done.clear()
            self._wake.clear()
            try:
                prompt = await self.steering.next_switch()
            except Exception:
                log.exception("could not read the prompt queue; retrying at the next block")
                continue
            if prompt is None or prompt.entry_id in {p.entry_id for p in self._in_flight.values()}:
                self._reanchor_alone()
                continue
            reanchor = self._reanchor_since is not None
            try:
                seq = self.supervisor.switch_prompt(prompt.text, reanchor=reanchor)
            except Exception:  # the switch is retried at the next block; the channel stays up
                log.exception("prompt switch could not be sent to the engine")
                continue
            self._reanchor_since = None
            self._in_flight[seq] = prompt
            log.info("switching to the prompt chosen by %s (#%d%s)", prompt.chosen_by, seq,
                     ", re-anchored" if reanchor else "")

    def request_reanchor(self) -> None:
        """Renew the engine's sink with the next switch, or on its own if no switch comes soon."""
        if self._reanchor_since is None:
            self._reanchor_since = time.monotonic()

    def _reanchor_alone(self) -> None:
        # Chat has the channel at a boundary and keeps its prompt: re-anchor without a switch.
        if self._reanchor_since is not None and time.monotonic() - self._reanchor_since > REANCHOR_WAIT_S:
            self._reanchor_since = None
            self.supervisor.reanchor()

    def expected_wait_s(self, state: dict, switch_s: float | None) -> float | None:
        """How long a prompt queued now waits until it is on air (`state`: `state()`'s answer).

        `switch_s` is what a switch takes from decision to air (the recent median); None when the
        wait cannot be known (vote mode between rounds, paused).
        """
        steering, now = self.steering, time.time()
        switch_s = switch_s or 0.0
        if state["paused"]:
            return None
        if state["mode"] == "vote":
            current = state["round"]
            if current is None or current["closed"]:
                return None
            return round(max(0.0, current["closes_at"] - now) + switch_s, 2)
        if state["mode"] == "manual":
            return round(switch_s, 2)  # the panel's prompts and approvals play at once
        min_play = steering.settings.queue.min_play_seconds
        # The one playing keeps the rest of its minimum; each queued ahead plays at least min_play.
        remaining = max(0.0, min_play - (now - steering.on_air_since))
        return round(remaining + len(state["queue"]) * min_play + switch_s, 2)

    async def state(self) -> dict:
        """Steering state for the API and overlays."""
        return await self.steering.state()
