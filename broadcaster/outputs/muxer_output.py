"""An output backed by a supervised muxer child process, with watchdog and reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import queue
import shutil
import threading
import time
from fractions import Fraction

from broadcaster.backoff import Backoff
from broadcaster.metrics import Metrics
from broadcaster.outputs.muxer_process import (
    BEAT,
    BYTES,
    CLOSE,
    CONNECTED,
    PACKETS,
    MuxTarget,
    run_muxer,
)
from broadcaster.outputs.rate import ByteRate
from broadcaster.outputs.retention import prune_recordings
from broadcaster.packets import AUDIO, VIDEO, EncodedPacket
from broadcaster.redact import redact_url
from broadcaster.timeline import RecordingTimeline

log = logging.getLogger(__name__)

_STOP = object()
_CTX = mp.get_context("spawn")
STABLE_SECONDS = 30.0  # a connection that lasted this long resets the backoff
DISK_POLL_S = 2.0
RESUME_FREE_BYTES = 64 * 1024 * 1024  # (or a quarter of a smaller file system) before a recording resumes


def _has_room(directory: str) -> bool:
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return True  # gone or unreadable: let the muxer try and say why
    return usage.free >= min(RESUME_FREE_BYTES, usage.total // 4)


class MuxerOutput:
    """Feeds packets to one muxer process; restarts it when it dies or stops making progress."""

    def __init__(
        self,
        target: MuxTarget,
        template: bytes,
        time_bases: tuple[Fraction, Fraction],
        metrics: Metrics,
        watchdog_seconds: float = 10.0,
        backoff: Backoff | None = None,
        queue_packets: int = 2000,
    ):
        self.target = target
        self.name = target.name
        self.template = template
        self.time_bases = time_bases
        self.metrics = metrics
        self.watchdog_seconds = watchdog_seconds
        self.backoff = backoff or Backoff(1.0, 30.0)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_packets)
        self._accepting = False
        self._need_keyframe = True
        self._closing = False
        self.process: mp.process.BaseProcess | None = None
        self.connected = False
        self.reconnects = 0
        self.watchdog_kills = 0
        self.last_error = ""
        self.files: list[str] = []
        self.planned_reconnects = 0
        self.disk_full = False
        # Recordings only: the prompt timeline written beside each file.
        self.timeline: RecordingTimeline | None = RecordingTimeline() if target.kind == "record" else None
        self._rate = ByteRate()
        self._heartbeat = None
        self.metrics.output_connected.labels(self.name).set(0)
        self.metrics.output_reconnects.labels(self.name)
        self.metrics.output_watchdog_kills.labels(self.name)
        self.metrics.output_planned_reconnects.labels(self.name)

    @property
    def shown_destination(self) -> str:
        """The destination as it may appear in logs and status."""
        destination = self.target.destination
        return redact_url(destination) if "://" in destination else destination

    def submit(self, packet: EncodedPacket) -> None:
        """Queue a packet without ever blocking the caller; a backlog drops up to the next keyframe."""
        if not self._accepting or packet.stream not in (VIDEO, AUDIO):
            return  # e.g. Opus for WebRTC: the muxers carry H.264 + AAC only
        if self._need_keyframe:
            if packet.stream != VIDEO or not packet.keyframe:
                return
            self._need_keyframe = False
        try:
            self._queue.put_nowait(packet)
        except queue.Full:
            self._need_keyframe = True
            self.metrics.output_dropped_packets.labels(self.name).inc()

    async def run(self) -> None:
        """Keep a muxer process running until `close()`."""
        first = True
        while not self._closing:
            if not first:
                self.reconnects += 1
                self.metrics.output_reconnects.labels(self.name).inc()
                delay = self.backoff.next_delay()
                log.info("output %s: reconnecting in %.1fs", self.name, delay)
                await self._sleep_unless_closing(delay)
                if self._closing:
                    break
            first = False
            started = time.monotonic()
            try:
                await self._run_once()
            except Exception as exc:  # no pipe, no thread, no process (fds or memory run out): retry
                self._set_connected(False)
                self.last_error = f"could not start the muxer: {type(exc).__name__}: {exc}"
                log.warning("output %s: %s", self.name, self.last_error)
            if self.disk_full:
                await self._wait_for_space()
            if time.monotonic() - started > STABLE_SECONDS:
                self.backoff.reset()

    async def _wait_for_space(self) -> None:
        """A full disk pauses the recording (no new empty file per retry) until space returns."""
        log.error("output %s: disk full at %s; recording paused until space returns (%s)", self.name,
                  self.target.destination, self.last_error)
        while not self._closing and not _has_room(self.target.destination):
            await self._sleep_unless_closing(DISK_POLL_S)
        self.disk_full = False
        if not self._closing:
            log.info("output %s: disk space is back; recording resumes", self.name)
            self.backoff.reset()

    async def _sleep_unless_closing(self, delay: float) -> None:
        end = time.monotonic() + delay
        while not self._closing and time.monotonic() < end:
            await asyncio.sleep(min(0.1, end - time.monotonic()))

    async def _run_once(self) -> None:
        with contextlib.ExitStack() as opened:
            # Whatever was opened before a failure (EMFILE in the second pipe...) is closed again.
            heartbeat = _CTX.Array("d", 4, lock=False)
            packets_read, packets_write = _CTX.Pipe(duplex=False)
            opened.callback(packets_read.close)
            opened.callback(packets_write.close)
            events_read, events_write = _CTX.Pipe(duplex=False)
            opened.callback(events_read.close)
            opened.callback(events_write.close)
            process = _CTX.Process(
                target=run_muxer,
                args=(self.target, self.template, self.time_bases, packets_read, heartbeat, events_write),
                name=f"muxer-{self.name}",
                daemon=True,
            )
            heartbeat[BEAT] = time.monotonic()
            process.start()
            packets_read.close()
            events_write.close()
            writer = threading.Thread(target=self._write_loop, args=(packets_write,), daemon=True,
                                      name=f"writer-{self.name}")
            try:
                self.process, self._heartbeat = process, heartbeat
                self._drain_queue()
                self._need_keyframe = True
                self._accepting = True
                writer.start()
            except BaseException:
                self._accepting = False
                process.kill()
                raise
            await self._supervise(process, heartbeat, writer, packets_write, events_read)

    async def _supervise(self, process, heartbeat, writer, packets_write, events_read) -> None:
        log.info("output %s: muxer pid %d -> %s", self.name, process.pid, self.shown_destination)
        try:
            while process.is_alive():
                self._read_events(events_read)
                self._sample_rate()
                silent = time.monotonic() - heartbeat[BEAT]
                if silent > self.watchdog_seconds:
                    self.watchdog_kills += 1
                    self.metrics.output_watchdog_kills.labels(self.name).inc()
                    self.last_error = f"no progress for {silent:.1f}s; muxer killed"
                    log.warning("output %s: %s", self.name, self.last_error)
                    process.kill()
                    break
                if self._closing:
                    await self._finish(process, packets_write)
                    break
                await asyncio.sleep(0.1)
            await asyncio.to_thread(process.join, 5)
            self._read_events(events_read)
        finally:
            self._accepting = False
            self._set_connected(False)
            self._drain_queue()
            self._queue.put_nowait(_STOP)
            await asyncio.to_thread(writer.join, 2)  # never on the event loop: the pipe may be stuck
            packets_write.close()
            events_read.close()
            if process.exitcode not in (0, None) and not self._closing and not self.last_error:
                self.last_error = f"muxer exited with code {process.exitcode}"
            if process.exitcode not in (0, None) and not self._closing:
                log.warning("output %s: muxer stopped (%s)", self.name, self.last_error)

    async def _finish(self, process, packets_write) -> None:
        """Let the muxer write its trailer, then make sure it is gone."""
        self._accepting = False
        try:
            await asyncio.to_thread(self._queue.put, _STOP, True, 5.0)
        except queue.Full:
            process.kill()  # stalled with a full backlog: nothing more can be written
        await asyncio.to_thread(process.join, 10)
        if process.is_alive():
            log.warning("output %s: muxer did not finish in time; killed", self.name)
            process.kill()

    def _write_loop(self, conn) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    if self._closing:
                        conn.send_bytes(CLOSE)
                    return
                conn.send_bytes(item.to_bytes())
            except OSError:
                return  # the muxer died; run() notices and restarts it

    def _drain_queue(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def _read_events(self, conn) -> None:
        try:
            while conn.poll():
                kind, detail = conn.recv()
                if kind == "connected":
                    self._set_connected(True)
                    self.last_error = ""
                    log.info("output %s: writing to %s", self.name, self.shown_destination)
                elif kind == "started":
                    path, base_seconds = detail
                    if self.target.kind == "record":
                        self.files.append(path)
                        if self.timeline is not None:
                            self.timeline.file_started(path, base_seconds)
                        if self.target.keep_hours:
                            prune_recordings(self.target.destination, self.target.file_prefix,
                                             self.target.keep_hours, keep={path})
                elif kind == "rotated" and self.target.kind == "record":
                    log.info("output %s: finished %s", self.name, detail)
                    if self.timeline is not None:
                        self.timeline.file_finished(detail)
                elif kind == "rotated":
                    self.planned_reconnects += 1
                    self.metrics.output_planned_reconnects.labels(self.name).inc()
                    log.info("output %s: planned reconnect #%d at a keyframe after %.0fs connected",
                             self.name, self.planned_reconnects, self.target.rotate_seconds or 0)
                elif kind == "closed" and detail and self.timeline is not None:
                    self.timeline.file_finished(detail)
                elif kind == "error":
                    self.last_error = detail
                elif kind == "disk_full":
                    self.last_error, self.disk_full = detail, True
        except (EOFError, OSError):
            return

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        self.metrics.output_connected.labels(self.name).set(1 if value else 0)

    def _sample_rate(self) -> None:
        if self._heartbeat is not None:
            self._rate.sample(time.monotonic(), self._heartbeat[BYTES])

    @property
    def bitrate_kbps(self) -> float:
        """Bytes written over the last couple of seconds, as kbit/s."""
        return self._rate.kbps() if self.connected else 0.0

    def status(self) -> dict:
        """Status for /healthz and the panel."""
        hb = self._heartbeat
        return {
            "kind": self.target.kind,
            "destination": self.shown_destination,
            "connected": self.connected,
            "reconnects": self.reconnects,
            "planned_reconnects": self.planned_reconnects,
            "watchdog_kills": self.watchdog_kills,
            "bitrate_kbps": round(self.bitrate_kbps, 1),
            "packets": int(hb[PACKETS]) if hb is not None else 0,
            "pid": self.process.pid if self.process is not None and self.process.is_alive() else None,
            "last_error": self.last_error,
            "heartbeat_age_s": round(time.monotonic() - hb[BEAT], 2) if hb is not None else None,
            "alive": bool(hb is not None and hb[CONNECTED] and self.connected),
            "disk_full": self.disk_full,
        }

    async def close(self) -> None:
        """Ask the muxer to finish its file/stream; `run()` returns once it has."""
        self._closing = True
