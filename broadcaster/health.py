"""What /healthz concludes from every part's status: ok, degraded (with reasons) or failing.

Failing (503) means no frames flow; anything else that is down makes the channel degraded
(200): an output, a chat source, the store, the disk, the engine, or file descriptors.
"""

from __future__ import annotations

import time
from collections.abc import Callable

GRACE_S = 5.0  # an output or source down for less than this is (re)connecting, not a fault
FD_WARN = 0.9  # open file descriptors above this share of the limit


class HealthVerdict:
    """Turns part statuses into reasons; remembers since when each part is down."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._down_since: dict[str, float] = {}

    def _down(self, key: str, down: bool) -> bool:
        if not down:
            self._down_since.pop(key, None)
            return False
        since = self._down_since.setdefault(key, self.clock())
        return self.clock() - since >= GRACE_S

    def reasons(self, parts: dict) -> list[str]:
        """Why the channel is degraded; empty when every part works."""
        reasons: list[str] = []
        for name, output in (parts.get("outputs") or {}).items():
            if output.get("disk_full"):
                reasons.append(f"output {name}: disk full, recording paused")
            elif self._down(f"output:{name}", not output.get("connected", True)):
                detail = output.get("last_error") or output.get("reason") or "not connected"
                reasons.append(f"output {name} down: {detail}")
        chat = parts.get("chat") or {}
        for source in chat.get("sources", ()):
            name = source.get("source", "?")
            if self._down(f"source:{name}", not source.get("connected", True)):
                reasons.append(f"chat source {name} disconnected: {source.get('last_error') or 'no detail'}")
        store = chat.get("store") or {}
        if store and not store.get("reachable", True):
            reasons.append(f"store unreachable: {store.get('last_error') or 'no detail'}")
        engine = parts.get("engine") or {}
        if engine.get("state") in ("restarting", "crash-loop"):
            reasons.append(f"engine {engine['state']}: {engine.get('last_error') or 'no detail'}")
        elif engine.get("state") in ("loading", "warmup", "compiling"):
            # The clock repeats the last frame meanwhile: on air, but not the model's video yet.
            reasons.append(f"engine {engine['state']}: {engine.get('phase') or 'starting'}")
        process = parts.get("process") or {}
        if (process.get("fd_use") or 0) >= FD_WARN:
            used, limit = process["open_fds"], process["fd_limit"]
            reasons.append(f"file descriptors nearly exhausted: {used} of {limit}")
        return reasons
