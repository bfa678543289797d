"""The HTTP server's connection cap and the process's file descriptors.

Every HTTP connection holds a file descriptor, and so does every pipe an output opens to
its muxer. Idle clients alone could use up the limit and make the next reconnect of an
output fail, so the server keeps at most `server.max_connections`, and never more than
half the open-file limit: the other half stays for the outputs and the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time

from aiohttp import web

from broadcaster.metrics import Metrics

_BUSY_BODY = json.dumps({"error": "too many open connections; try again shortly"}).encode()
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


def fd_limit() -> int:
    """The soft open-file limit (it can change while running: prlimit)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_fds() -> int | None:
    """How many file descriptors this process holds; None where /proc is missing."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself held
    except OSError:
        return None


def fd_status() -> dict:
    """Open file descriptors against the limit, for /healthz."""
    limit, used = fd_limit(), open_fds()
    return {"open_fds": used, "fd_limit": limit,
            "fd_use": round(used / limit, 3) if used is not None and limit > 0 else None}


class ConnectionCap:
    """Counts the server's connections and closes those over the cap with a 503."""

    def __init__(self, server: web.Server, max_connections: int, metrics: Metrics):
        self.max_connections = max_connections
        self.metrics = metrics
        self.open = 0
        self._made, self._lost = server.connection_made, server.connection_lost
        # aiohttp's Server is the manager every connection reports to: hook in there.
        server.connection_made = self._connection_made  # type: ignore[method-assign]
        server.connection_lost = self._connection_lost  # type: ignore[method-assign]

    @property
    def limit(self) -> int:
        """The cap now: the setting, or half the open-file limit if that is lower."""
        return max(1, min(self.max_connections, fd_limit() // 2))

    def _connection_made(self, handler, transport: asyncio.Transport) -> None:
        self._made(handler, transport)
        self.open += 1
        self.metrics.http_connections.set(self.open)
        if self.open > self.limit:
            self.metrics.http_refused.labels("connections").inc()
            transport.write(BUSY)
            transport.close()

    def _connection_lost(self, handler, exc: BaseException | None = None) -> None:
        self.open -= 1
        self.metrics.http_connections.set(self.open)
        self._lost(handler, exc)


class AcceptErrorFilter(logging.Filter):
    """asyncio logs a traceback for every refused accept() at the fd limit (a hundred a second):
    keep one line per `every_s`, without the traceback, saying how many were folded into it."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, every_s: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._last = -every_s
        self._folded = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the repeats; the kept record is shortened to one line."""
        if not str(record.msg).startswith(self.MESSAGE):
            return True
        now = self.clock()
        if now - self._last < self.every_s:
            self._folded += 1
            return False
        error = record.exc_info[1] if record.exc_info else None
        record.msg = (f"{self.MESSAGE} ({error}); new HTTP connections wait until descriptors are free"
                      + (f" ({self._folded} more since the last line)" if self._folded else ""))
        record.args, record.exc_info, record.exc_text = (), None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self._last, self._folded = now, 0
        return True


def quiet_accept_errors() -> None:
    """Install the filter once on the asyncio logger."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, AcceptErrorFilter) for f in logger.filters):
        logger.addFilter(AcceptErrorFilter())
