"""Fault injection against a real channel (promptcast run), real Redis (AOF on) and real nginx-rtmp.

Per fault the suite prints one row: faults injected, chat lines answered 202, of those found in
Redis afterwards, duplicates, the longest gap between output frames seen from outside (the
frame counter polled every 50 ms), and the time to recover. Every fault must keep the process
alive and frames flowing, and nothing answered 202 may be missing afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chat.redis_store import RedisStore
from tests.channel import Channel, frames_output, small_channel
from tests.redis_server import RedisServer, redis_available
from tests.servers import NginxRtmp, wait_until

pytestmark = [pytest.mark.servers,
              pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")]

TOKEN = "test-token-0123456789"
ROWS: list[str] = []


@dataclass
class Sender:
    """Posts distinct `!prompt` lines from distinct viewers; remembers which were answered 202."""

    channel: Channel
    accepted: list[str] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)
    n: int = 0

    def say(self, timeout: float = 12) -> int:
        self.n += 1
        text = f"a lighthouse number {self.n} in the fog"
        request = urllib.request.Request(
            self.channel.url(f"/api/chat?login=viewer{self.n}"), method="POST",
            data=json.dumps({"text": f"!prompt {text}"}).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
            if status == 503:
                assert exc.headers.get("Retry-After"), "503 without Retry-After"
        except OSError:
            status = 0  # no answer at all (the service was killed): not accepted
        if status == 202:
            self.accepted.append(text)
        else:
            self.refused[status] += 1
        return status


def _prompt_status(channel: Channel) -> int:
    request = urllib.request.Request(
        channel.url("/api/prompt"), method="POST", data=json.dumps({"prompt": "a quiet harbour"}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=12) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        assert exc.code != 503 or exc.headers.get("Retry-After"), "503 without Retry-After"
        return exc.code


class Gaps:
    """Polls the output frame counter from outside; the longest time it did not move."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.longest = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last_value, last_change = None, time.monotonic()
        while not self._stop.wait(0.1):  # 10 requests/s: half the per-address rate limit
            try:
                value = frames_output(self.channel)
            except Exception:  # refused (503 at the connection cap) or cut off: no sample
                last_value = None  # a span without readings is not counted as a gap
                continue
            now = time.monotonic()
            self.samples += 1
            if value != last_value:
                if last_value is not None:
                    self.longest = max(self.longest, now - last_change)
                last_value, last_change = value, now

    def _late(self) -> int:
        return (self.channel.health().get("pacer") or {}).get("late_frames", 0)

    def __enter__(self) -> Gaps:
        self.late = -self._late()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.late += self._late()  # frames the clock sent over 1.5 intervals late, seen from inside


def _stored(redis: RedisServer) -> list[str]:
    async def read() -> list[str]:
        store = RedisStore(redis.url, "test")
        try:
            return [s.raw for s in await store.suggestions(limit=100_000)]
        finally:
            await store.close()

    return asyncio.run(read())


def _row(fault: str, injected: int, sender: Sender | None, stored: list[str] | None, gaps: Gaps | None,
         recovery: float) -> None:
    late = gaps.late if gaps else 0
    # Where /metrics could not be read (the fd limit stops accepting), only the clock's own count says.
    gap = "–" if gaps is None else f"{gaps.longest:.2f} s" if gaps.samples >= 10 else "not readable"
    accepted = len(sender.accepted) if sender else 0
    found = sum(1 for t in set(sender.accepted) if t in set(stored)) if sender and stored is not None else 0
    duplicates = sum(n - 1 for n in Counter(stored or []).values() if n > 1)
    ROWS.append(f"| {fault} | {injected} | {accepted} | {found} | {duplicates} | {gap} | {late} "
                f"| {recovery:.1f} s |")
    if sender is not None and stored is not None:
        missing = set(sender.accepted) - set(stored)
        assert not missing, f"{fault}: answered 202 but not stored: {sorted(missing)[:5]}"
    assert duplicates == 0, f"{fault}: {duplicates} duplicates"


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    header = ["| fault | injected | answered 202 | found after | duplicates | longest frame gap "
              "| late frames | recovery |", "|---|---|---|---|---|---|---|---|"]
    print("\n" + "\n".join(header + ROWS))


def _config(tmp_path: Path, redis: RedisServer, outputs: list[dict]) -> dict:
    return small_channel(tmp_path, outputs, store={"kind": "redis", "url": redis.url},
                         chat={"mode": "manual", "moderation": {"rate_limit_per_minute": 1000}})


def _engine(channel: Channel) -> dict:
    return channel.health().get("engine") or {}


def _rtmp(nginx: NginxRtmp, key: str) -> list[dict]:
    return [{"kind": "rtmp", "url": nginx.url(key), "reconnect_max_s": 2}]


def _recovered(predicate, timeout: float) -> float:
    started = time.monotonic()
    wait_until(predicate, timeout, 0.2)
    return time.monotonic() - started


def test_redis_kill_pause_nginx_kill_engine_kill_and_stop(tmp_path):
    with (RedisServer(tmp_path, appendonly=True) as redis, NginxRtmp(tmp_path) as nginx,
          Channel(tmp_path, _config(tmp_path, redis, _rtmp(nginx, "faults"))) as channel):
        wait_until(lambda: nginx.is_publishing("faults"), 20, message=channel.logs())

        # Redis SIGKILL while lines keep coming: 202 only for what Redis took, 503 + Retry-After else.
        sender = Sender(channel)
        with Gaps(channel) as gaps:
            for _ in range(5):
                assert sender.say() == 202
            redis.kill()
            refused = [sender.say() for _ in range(3)]
            assert set(refused) == {503}, refused
            assert _prompt_status(channel) == 503  # the panel's direct prompt too
            redis.start()
            recovery = _recovered(lambda: sender.say() == 202, 30)
            for _ in range(5):
                sender.say()
        _row("Redis SIGKILL (AOF on)", 1, sender, _stored(redis), gaps, recovery)

        # Redis SIGSTOP: a hung store answers 503 after the store's time bound, never 202.
        sender = Sender(channel)
        sender.n = 1000
        with Gaps(channel) as gaps:
            redis.pause()
            assert sender.say(timeout=20) == 503
            assert channel.health()["status"] == "degraded"
            redis.resume()
            recovery = _recovered(lambda: sender.say() == 202, 30)
        _row("Redis SIGSTOP", 1, sender, _stored(redis), gaps, recovery)

        # nginx-rtmp SIGKILL: the output reconnects, the clock never waits.
        with Gaps(channel) as gaps:
            nginx.kill()
            time.sleep(2)
            nginx.start()
            recovery = _recovered(lambda: nginx.is_publishing("faults"), 40)
        _row("nginx-rtmp SIGKILL", 1, None, None, gaps, recovery)

        # Engine SIGKILL and SIGSTOP: the supervisor restarts it; frames repeat meanwhile.
        for sig, name in ((signal.SIGKILL, "engine SIGKILL"), (signal.SIGSTOP, "engine SIGSTOP")):
            pid = channel.health()["engine"]["pid"]
            with Gaps(channel) as gaps:
                os.kill(pid, sig)
                recovery = _recovered(lambda p=pid: _engine(channel).get("pid") not in (None, p)
                                      and _engine(channel).get("state") == "running", 60)
            if sig == signal.SIGSTOP:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _row(name, 1, None, None, gaps, recovery)
        assert channel.process.poll() is None
        assert channel.health()["pacer"]["last_tick_age_s"] < 1


def test_file_descriptors_exhausted_by_idle_connections(tmp_path):
    with (RedisServer(tmp_path, appendonly=True) as redis, NginxRtmp(tmp_path) as nginx,
          Channel(tmp_path, _config(tmp_path, redis, _rtmp(nginx, "fds"))) as channel):
        wait_until(lambda: nginx.is_publishing("fds"), 20, message=channel.logs())
        subprocess.run(["prlimit", "--pid", str(channel.process.pid), "--nofile=256:256"], check=True)
        sender = Sender(channel)
        with Gaps(channel) as gaps:
            socks = []
            for _ in range(300):
                try:
                    s = socket.create_connection(("127.0.0.1", channel.port), timeout=1)
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: ")
                    socks.append(s)
                except OSError:
                    pass
            nginx.kill()  # the output must reconnect while the connections hold the descriptors
            nginx.start()
            time.sleep(3)
            for s in socks:
                s.close()
            recovery = _recovered(lambda: channel.health()["status"] in ("ok", "degraded"), 30)
            for _ in range(5):
                sender.say()
            wait_until(lambda: nginx.is_publishing("fds"), 40, message=channel.logs())
        assert channel.process.poll() is None
        _row("file descriptors exhausted (300 idle connections, nofile 256)", 300, sender, _stored(redis),
             gaps, recovery)


def test_service_sigkill_with_lines_in_flight(tmp_path):
    with RedisServer(tmp_path, appendonly=True) as redis:
        channel = Channel(tmp_path, _config(tmp_path, redis, [])).start()
        sender = Sender(channel)
        threads = [threading.Thread(target=lambda: [sender.say() for _ in range(15)]) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        channel.process.kill()
        for t in threads:
            t.join(30)
        channel.stop()
        restarted = Channel(tmp_path, _config(tmp_path, redis, []))
        started = time.monotonic()
        with restarted:
            recovery = time.monotonic() - started
            stored = _stored(redis)
        _row("service SIGKILL with lines in flight", 1, sender, stored, None, recovery)


def test_disk_full_pauses_the_recording_without_empty_files(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        rec = disk / "rec"
        with (RedisServer(tmp_path, appendonly=True) as redis,
              Channel(tmp_path, _config(tmp_path, redis, [{"kind": "record", "dir": str(rec),
                                                            "name": "rec"}])) as channel):
            wait_until(lambda: any(rec.glob("*.mp4")), 20, message=channel.logs())
            filler = disk / "filler"
            with Gaps(channel) as gaps:
                with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
                    while True:
                        f.write(b"\0" * 65536)
                wait_until(lambda: channel.health()["outputs"]["rec"]["disk_full"], 30,
                           message=channel.logs())
                assert channel.health()["status"] == "degraded"
                files = len(list(rec.glob("*.mp4")))
                time.sleep(6)  # several retry periods: no new (empty) file meanwhile
                assert len(list(rec.glob("*.mp4"))) == files
                assert not [p for p in rec.glob("*.mp4") if p.stat().st_size == 0]
                filler.unlink()
                recovery = _recovered(lambda: channel.health()["outputs"]["rec"]["connected"], 30)
            assert channel.process.poll() is None
            _row("disk full (3 MB tmpfs)", 1, None, None, gaps, recovery)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
