"""Real local servers and ffprobe helpers for integration tests.

Each test starts and stops its own servers on free ports, so tests can run in parallel
and never depend on a system-wide nginx.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import threading
from typing import Any

from broadcaster.nginx_rtmp import (  # noqa: F401  (re-exported: the tests' one place for servers)
    DEFAULT_RTMP_MODULE,
    NGINX_BIN,
    NginxRtmp,
    _port_open,
    find_rtmp_module,
    free_port,
    wait_until,
)

FFPROBE_BIN = "ffprobe"


class BlackHoleServer:
    """TCP server that accepts connections, reads and discards input, and never sends a byte."""

    def __init__(self) -> None:
        """Bind a free port on 127.0.0.1; call start() to begin accepting."""
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self.bytes_received = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._clients: list[socket.socket] = []

    def url(self, key: str = "test") -> str:
        """RTMP URL pointing at the black hole."""
        return f"rtmp://127.0.0.1:{self.port}/live/{key}"

    def start(self) -> BlackHoleServer:
        """Start listening and accepting in a daemon thread."""
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"blackhole-{self.port}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        try:
                            conn, _ = sock.accept()
                        except BlockingIOError:
                            continue
                        conn.setblocking(False)
                        sel.register(conn, selectors.EVENT_READ)
                        with self._lock:
                            self.connections += 1
                            self._clients.append(conn)
                        continue
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        with self._lock:
                            self.bytes_received += len(data)
                    else:
                        sel.unregister(sock)
                        sock.close()
        finally:
            sel.close()

    def stop(self) -> None:
        """Stop the thread and close the listener and every accepted connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with self._lock:
            clients, self._clients = self._clients, []
        for conn in clients:
            conn.close()
        self._listener.close()

    def __enter__(self) -> BlackHoleServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProbeError(RuntimeError):
    """ffprobe failed (non-zero exit, or timed out: see ProbeTimeout)."""


class ProbeTimeout(ProbeError, TimeoutError):
    """ffprobe did not finish within the subprocess timeout and was killed."""


# Per-read stall limit for network inputs. A healthy live RTMP stream never goes this long without
# a byte (audio flows between keyframes), while a dead server fails fast with a readable error.
PROBE_RW_TIMEOUT = 5.0


def _is_network(url: str) -> bool:
    return "://" in url and not url.startswith("file:")


def _run_ffprobe(args: list[str], url: str, timeout: float) -> dict[str, Any]:
    cmd = [FFPROBE_BIN, "-v", "error"]
    if _is_network(url):
        # rw_timeout (µs) makes ffprobe itself give up on a stalled socket, including an RTMP
        # handshake that never gets an answer; the subprocess timeout is the hard stop. Never pass
        # -timeout for rtmp: there it means "listen for incoming connections".
        rw_timeout = min(timeout, PROBE_RW_TIMEOUT)
        cmd += ["-rw_timeout", str(int(rw_timeout * 1_000_000))]
    cmd += [*args, "-of", "json", str(url)]
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ProbeTimeout(f"ffprobe timed out after {timeout}s on {url}") from exc
    if res.returncode != 0:
        raise ProbeError(f"ffprobe failed ({res.returncode}) on {url}: {res.stderr.decode(errors='replace')}")
    return json.loads(res.stdout or b"{}")


def probe_streams(url_or_path: str | os.PathLike[str], timeout: float = 20) -> dict[str, Any]:
    """ffprobe -show_streams -show_format as a dict; raises ProbeError/ProbeTimeout instead of hanging."""
    # Over RTMP this takes ~5 s (the default analyzeduration). Do not shorten it: nginx-rtmp only
    # starts sending video to a new player at the next keyframe, so a short analysis (e.g. 1 s)
    # reports the audio stream alone.
    return _run_ffprobe(["-show_streams", "-show_format"], str(url_or_path), timeout)


def probe_packets(
    url_or_path: str | os.PathLike[str], seconds: float, timeout: float | None = None
) -> list[dict[str, Any]]:
    """Packets (stream_index, codec_type, pts/dts, size, flags) read for `seconds` of media time."""
    timeout = seconds + 20 if timeout is None else timeout
    args = [
        "-read_intervals",
        f"%+{seconds}",
        "-show_packets",
        "-show_entries",
        "packet=stream_index,codec_type,pts_time,dts_time,size,flags",
    ]
    return _run_ffprobe(args, str(url_or_path), timeout).get("packets", [])


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # ffprobe writes "N/A" for unknown timestamps


def keyframe_times(packets: list[dict[str, Any]], codec_type: str = "video") -> list[float]:
    """Sorted pts_time of keyframe packets ('K' in flags) of one codec type."""
    times = []
    for pkt in packets:
        if pkt.get("codec_type") != codec_type or "K" not in str(pkt.get("flags", "")):
            continue
        t = _float(pkt.get("pts_time"))
        if t is not None:
            times.append(t)
    return sorted(times)


def bitrate_kbps(packets: list[dict[str, Any]], codec_type: str = "video") -> float:
    """Payload bitrate: total bytes*8 over the pts span, in kbit/s (0.0 if the span is empty)."""
    times = []
    total = 0
    for pkt in packets:
        if pkt.get("codec_type") != codec_type:
            continue
        total += int(pkt.get("size") or 0)
        t = _float(pkt.get("pts_time"))
        if t is not None:
            times.append(t)
    if len(times) < 2 or max(times) <= min(times):
        return 0.0
    return total * 8 / (max(times) - min(times)) / 1000
