"""A private nginx with the RTMP module: the local RTMP server of `promptcast bench switch` and the tests.

Each instance runs in its own prefix directory on free ports, so several can run side by side and
none depends on a system-wide nginx (Debian: `apt install nginx libnginx-mod-rtmp`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

NGINX_BIN = "nginx"
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
