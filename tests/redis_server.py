"""A private redis-server for tests: its own free port and directory, never the system one.

    with RedisServer(tmp_path) as server:          # --save "" --appendonly no
        store = RedisStore(server.url, "demo")
    RedisServer(tmp_path, appendonly=True)          # AOF (fsync always): data survives kill()

`restart()` comes back on the same port; with `keep_data` (default: only with AOF) the data
set survives it (AOF, or an RDB snapshot taken by `SHUTDOWN SAVE`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.servers import free_port, wait_until

REDIS_BIN = "redis-server"


def redis_available() -> bool:
    """True when a redis-server binary is on PATH."""
    return shutil.which(REDIS_BIN) is not None


def _command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one RESP command over a fresh socket; return the first reply chunk (b'' on EOF)."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        try:
            return s.recv(65536)
        except ConnectionResetError:
            return b""


class RedisServer:
    """A real redis-server in the foreground, pid and log in its own directory."""

    def __init__(self, tmp_path: str | os.PathLike[str] | None = None, *, appendonly: bool = False,
                 start_timeout: float = 10.0) -> None:
        """Allocate a port and a directory (under tmp_path, or a temp dir removed on exit)."""
        self._owns_dir = tmp_path is None
        self.dir = Path(tempfile.mkdtemp(prefix="redis-", dir=tmp_path))
        self.appendonly = appendonly
        self.start_timeout = start_timeout
        self.port = free_port()
        self.log = self.dir / "redis.log"
        self.pidfile = self.dir / "redis.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0"""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def _argv(self) -> list[str]:
        argv = [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "no",
                "--dir", str(self.dir), "--pidfile", str(self.pidfile), "--logfile", str(self.log),
                "--save", "", "--dbfilename", "dump.rdb", "--protected-mode", "yes"]
        if self.appendonly:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        return argv

    def logs(self) -> str:
        """The server log, for failure messages."""
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")
        return ""

    def ping(self) -> bool:
        """True when the server answers PING with PONG (not while loading its data)."""
        try:
            return _command(self.port, "PING").startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> RedisServer:
        """Run redis-server and wait until it answers PING; RuntimeError with the log if it cannot."""
        if self.running:
            raise RuntimeError("redis-server already running")
        for attempt in range(3):
            self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + self.start_timeout
            while not self.ping():
                if self.proc.poll() is not None:
                    break
                if time.monotonic() >= deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server not ready on {self.port} in {self.start_timeout}s\n"
                                       f"{self.logs()}")
                time.sleep(0.01)
            if self.running:
                self._started_once = True
                return self
            rc = self.proc.returncode
            self.proc = None
            # Lost the port to someone else between free_port() and bind: only on the first start,
            # since restart() promises the same port.
            if self._started_once or attempt == 2:
                raise RuntimeError(f"redis-server exited with {rc}\n{self.logs()}")
            self.port = free_port()
        raise AssertionError("unreachable")

    def stop(self, save: bool = False, timeout: float = 5.0) -> None:
        """Shut down cleanly (SHUTDOWN SAVE writes dump.rdb first when `save`); SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                _command(self.port, "SHUTDOWN", "SAVE" if save else "NOSAVE", timeout=timeout)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash. Only what the AOF (appendonly=True) already holds survives."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server accepts TCP connections (kernel backlog) but never answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def wipe(self) -> None:
        """Delete the persisted data files (server must be stopped)."""
        assert not self.running
        (self.dir / "dump.rdb").unlink(missing_ok=True)
        shutil.rmtree(self.dir / "appendonlydir", ignore_errors=True)

    def restart(self, keep_data: bool | None = None) -> RedisServer:
        """Stop and start again on the same port; keep_data defaults to whether AOF is on."""
        keep = self.appendonly if keep_data is None else keep_data
        self.stop(save=keep and not self.appendonly)
        if not keep:
            self.wipe()
        wait_until(lambda: not self.ping(), 5, 0.02, f"port {self.port} still answers after stop")
        return self.start()

    def close(self) -> None:
        """Stop, and remove the directory if this server created it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a paused server cannot shut down
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, dir={str(self.dir)!r}, appendonly={self.appendonly})"
