"""`promptcast bench soak --faults`: faults injected into the soaking channel, one at a time, measured.

Each fault, in turn every `every_s` seconds: engine SIGKILL, engine SIGSTOP, each muxer SIGKILL,
and file descriptors exhausted (the open-file limit lowered to what is open plus a few, 300
idle connections to the channel's own port, a muxer killed so its output must reconnect under
the limit). While a fault lasts, chat lines are posted to the channel's own `/api/chat`;
afterwards the store is read back. One row per fault: injected, answered 202, found in the
store, duplicates, longest gap between output frames, recovery time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import time
from collections import Counter
from dataclasses import dataclass

from aiohttp import ClientSession, ClientTimeout

from broadcaster.api_token import api_token
from broadcaster.connections import open_fds
from broadcaster.service import Service

LINES_PER_FAULT = 5
RECOVERY_TIMEOUT_S = 120.0
IDLE_CONNECTIONS = 300


@dataclass
class FaultRow:
    """What one injected fault did to the channel."""

    fault: str
    injected: int
    accepted: int
    found: int
    duplicates: int
    max_gap_ms: float
    recovery_s: float | None

    def markdown(self) -> str:
        """One table row."""
        recovery = f"{self.recovery_s:.1f} s" if self.recovery_s is not None else "NOT RECOVERED"
        return (f"| {self.fault} | {self.injected} | {self.accepted} | {self.found} | {self.duplicates} "
                f"| {self.max_gap_ms:.0f} ms | {recovery} |")


HEADER = ("| fault | injected | answered 202 | found after | duplicates | longest frame gap | recovery |\n"
          "|---|---|---|---|---|---|---|")


class FaultInjector:
    """Runs beside the soak; `rows` grows by one per fault."""

    def __init__(self, service: Service, every_s: float):
        self.service = service
        self.every_s = every_s
        self.rows: list[FaultRow] = []
        self._said = 0
        self._accepted: list[str] = []

    def _faults(self) -> list[str]:
        names = ["engine SIGKILL", "engine SIGSTOP"]
        names += [f"muxer SIGKILL ({o.name})" for o in self.service.outputs if hasattr(o, "process")]
        if any(hasattr(o, "process") for o in self.service.outputs):
            names.append("file descriptors exhausted")
        return names

    async def run(self) -> None:
        """Inject the faults in turn until cancelled."""
        token = api_token(self.service.settings)
        async with ClientSession(timeout=ClientTimeout(total=15),
                                 headers={"Authorization": f"Bearer {token}"}) as http:
            turn = 0
            while True:
                await asyncio.sleep(self.every_s)
                faults = self._faults()
                name = faults[turn % len(faults)]
                turn += 1
                self.rows.append(await self._one(http, name))

    async def _one(self, http: ClientSession, name: str) -> FaultRow:
        pacer = self.service.pacer
        pacer.gap_windows["faults"] = 0.0
        self._accepted = []
        injected = 1
        started = time.monotonic()
        if name.startswith("engine"):
            recovered = await self._engine(http, signal.SIGKILL if "SIGKILL" in name else signal.SIGSTOP)
        elif name.startswith("muxer"):
            output = next(o for o in self.service.outputs if f"({o.name})" in name)
            recovered = await self._muxer(http, output)
        else:
            injected = IDLE_CONNECTIONS
            recovered = await self._fds(http)
        found, duplicates = await self._found()
        return FaultRow(name, injected, len(self._accepted), found, duplicates,
                        round(pacer.gap_windows.pop("faults", 0.0) * 1000, 1),
                        None if recovered is None else round(recovered - started, 1))

    async def _say(self, http: ClientSession) -> None:
        for _ in range(LINES_PER_FAULT):
            self._said += 1
            text = f"a lantern number {self._said} on a dark river"
            url = f"http://127.0.0.1:{self.service.http_port}/api/chat"
            try:
                async with http.post(url, params={"login": f"soak{self._said}"},
                                     json={"text": f"!prompt {text}"}) as answer:
                    if answer.status == 202:
                        self._accepted.append(text)
            except (TimeoutError, OSError):
                pass  # no answer: not accepted

    async def _until(self, done) -> float | None:
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            if done():
                return time.monotonic()
            await asyncio.sleep(0.1)
        return None

    async def _engine(self, http: ClientSession, sig: signal.Signals) -> float | None:
        supervisor = self.service.supervisor
        pid = supervisor.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        await self._say(http)
        recovered = await self._until(lambda: supervisor.state == "running"
                                      and supervisor.process is not None and supervisor.process.pid != pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a stopped engine the supervisor gave up on
        return recovered

    async def _muxer(self, http: ClientSession, output) -> float | None:
        process = output.process
        if process is not None and process.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        await asyncio.sleep(0.5)
        await self._say(http)
        return await self._until(lambda: output.connected and output.process is not process)

    async def _fds(self, http: ClientSession) -> float | None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        used = open_fds() or 64
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, used + 40), hard))
        idle: list[asyncio.StreamWriter] = []
        output = next(o for o in self.service.outputs if hasattr(o, "process"))
        try:
            for _ in range(IDLE_CONNECTIONS):
                try:
                    _, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", self.service.http_port), 1)
                except (OSError, TimeoutError):
                    continue
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: ")
                idle.append(writer)
            if output.process is not None and output.process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(output.process.pid, signal.SIGKILL)
            await self._say(http)
            await asyncio.sleep(3)
        finally:
            for writer in idle:
                writer.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        return await self._until(lambda: output.connected)

    async def _found(self) -> tuple[int, int]:
        pool = await self.service.store.suggestions(limit=100_000)
        raws = Counter(s.raw for s in pool)
        return sum(1 for t in self._accepted if raws.get(t)), sum(n - 1 for n in raws.values() if n > 1)


def fault_table(rows: list[FaultRow]) -> str:
    """The fault rows as Markdown (empty when no fault was injected)."""
    if not rows:
        return "faults: none injected (the run was shorter than one fault interval)"
    lost = sum(r.accepted - r.found for r in rows)
    verdict = (f"faults: {len(rows)} injected; {'nothing' if lost == 0 else f'{lost} LINES'} answered 202 "
               f"missing afterwards; {'all' if all(r.recovery_s is not None for r in rows) else 'NOT all'} "
               "recovered")
    return "\n".join([HEADER, *(r.markdown() for r in rows), "", verdict])
