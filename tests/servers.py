"""Real local servers and ffprobe helpers for integration tests.

Each test starts and stops its own servers on free ports, so tests can run in parallel
and never depend on a system-wide nginx.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

NGINX_BIN = "nginx"
FFPROBE_BIN = "ffprobe"
# Debian's libnginx-mod-rtmp installs here; modules-enabled is checked first in case a
# distribution puts it elsewhere.
DEFAULT_RTMP_MODULE = "/usr/lib/nginx/modules/ngx_rtmp_module.so"
# nginx resolves a relative load_module path against its compiled-in prefix, not -p.
NGINX_COMPILED_PREFIX = "/usr/share/nginx"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, message: str = "") -> Any:
    """Poll predicate until it returns truthy and return that value; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        time.sleep(interval)


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def find_rtmp_module() -> str:
    """Return the path of ngx_rtmp_module.so, preferring what /etc/nginx/modules-enabled loads."""
    for conf in sorted(glob.glob("/etc/nginx/modules-enabled/*rtmp*")):
        try:
            text = Path(conf).read_text()
        except OSError:
            continue
        m = re.search(r"load_module\s+([^;\s]+)\s*;", text)
        if m:
            path = Path(m.group(1))
            if not path.is_absolute():
                path = Path(NGINX_COMPILED_PREFIX) / path
            if path.exists():
                return str(path.resolve())
    if Path(DEFAULT_RTMP_MODULE).exists():
        return DEFAULT_RTMP_MODULE
    raise FileNotFoundError("ngx_rtmp_module.so not found; install libnginx-mod-rtmp")


class NginxRtmp:
    """A real nginx with the RTMP module, in its own prefix dir and on its own ports."""

    def __init__(self, tmp_path: str | os.PathLike[str], start_timeout: float = 10.0) -> None:
        """Allocate ports and a prefix dir under tmp_path; call start() to run it."""
        # mkdtemp so several servers can share one tmp_path.
        self.prefix = Path(tempfile.mkdtemp(prefix="nginx-rtmp-", dir=tmp_path))
        self.port = free_port()
        self.http_port = free_port()
        while self.http_port == self.port:  # two bind-and-close calls may get the same port back
            self.http_port = free_port()
        self.start_timeout = start_timeout
        self.error_log = self.prefix / "logs" / "error.log"
        # nginx prints to stderr before it has read error_log from the config.
        self.stderr_log = self.prefix / "logs" / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        p = self.prefix
        for d in ("logs", "tmp/client_body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            (p / d).mkdir(parents=True, exist_ok=True)
        # As root nginx would drop workers to nobody, who cannot write into pytest's 0700 tmp dirs.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = f"""load_module {find_rtmp_module()};
{user}worker_processes 1;
pid {p}/nginx.pid;
lock_file {p}/nginx.lock;
error_log {self.error_log} info;
events {{ worker_connections 256; }}
rtmp {{
    server {{
        listen 127.0.0.1:{self.port};
        chunk_size 4096;
        application live {{
            live on;
            record off;
        }}
    }}
}}
http {{
    access_log {p}/logs/access.log;
    client_body_temp_path {p}/tmp/client_body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    server {{
        listen 127.0.0.1:{self.http_port};
        location /stat {{ rtmp_stat all; }}
    }}
}}
"""
        (p / "nginx.conf").write_text(conf)

    @property
    def conf_path(self) -> Path:
        """Path of the generated nginx.conf."""
        return self.prefix / "nginx.conf"

    def url(self, key: str = "test") -> str:
        """RTMP publish/play URL for a stream key in the 'live' application."""
        return f"rtmp://127.0.0.1:{self.port}/live/{key}"

    @property
    def stat_url(self) -> str:
        """URL of the rtmp_stat XML page."""
        return f"http://127.0.0.1:{self.http_port}/stat"

    @property
    def running(self) -> bool:
        """True while the nginx master process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        """Captured stderr plus error.log, for failure messages."""
        parts = []
        for path in (self.stderr_log, self.error_log):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def start(self) -> NginxRtmp:
        """Run nginx and wait until the RTMP port accepts TCP; RuntimeError with the logs if it exits."""
        if self.running:
            raise RuntimeError("nginx already running")
        with open(self.stderr_log, "ab") as err:
            # Own session so kill() can SIGKILL master and worker together: a worker whose master
            # died keeps serving the port, which would not look like a crash at all.
            self.proc = subprocess.Popen(
                [NGINX_BIN, "-p", f"{self.prefix}/", "-c", str(self.conf_path), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while not (_port_open(self.port) and _port_open(self.http_port)):
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"nginx exited with {rc} during start\n{self.logs()}")
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(
                    f"nginx did not listen on {self.port} in {self.start_timeout}s\n{self.logs()}"
                )
            time.sleep(0.02)
        return self

    def _killpg(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        """Shut nginx down (SIGTERM), SIGKILL the whole group if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._killpg(signal.SIGKILL)
                self.proc.wait(timeout)
        # A worker may outlive a master that was stopped from outside.
        self._killpg(signal.SIGKILL)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL master and worker at once, to simulate a crash mid-stream."""
        if self.proc is None:
            return
        self._killpg(signal.SIGKILL)
        self.proc.wait(5)
        self.proc = None
        # The worker is reparented, not our child: wait until the kernel has dropped its socket.
        wait_until(lambda: not _port_open(self.port), 5, 0.02, f"port {self.port} still open after kill")

    def restart(self) -> NginxRtmp:
        """Stop (if running) and start again on the same ports."""
        self.stop()
        return self.start()

    def stat(self, timeout: float = 5.0) -> str:
        """Return the rtmp_stat XML text."""
        with urllib.request.urlopen(self.stat_url, timeout=timeout) as resp:
            return resp.read().decode("utf-8", errors="replace")

    def streams(self, app: str = "live") -> dict[str, bool]:
        """Map stream name -> whether it has an active publisher, from the stat XML."""
        root = ET.fromstring(self.stat())
        out: dict[str, bool] = {}
        for application in root.iter("application"):
            if application.findtext("name") != app:
                continue
            for stream in application.iter("stream"):
                name = stream.findtext("name") or ""
                out[name] = out.get(name, False) or stream.find("publishing") is not None
        return out

    def is_publishing(self, key: str = "test") -> bool:
        """True if someone is currently publishing to live/KEY."""
        return self.streams().get(key, False)

    def __enter__(self) -> NginxRtmp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"NginxRtmp(port={self.port}, http_port={self.http_port}, prefix={str(self.prefix)!r})"


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
