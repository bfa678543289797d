"""`kind: whip`: push the shared H.264 + Opus to a WHIP ingest over WebRTC, with reconnects.

One RTCPeerConnection at a time: POST the SDP offer (201 + answer + Location), wait for
ICE + DTLS, then feed the pre-encoded packets (no per-output encode; see
broadcaster/webrtc.py). The session is over when the connection fails or closes, or when
the ingest stops sending RTCP receiver reports for `watchdog_seconds` (a killed ingest
sends nothing; ICE consent freshness alone would take ~30 s to notice). Then DELETE the
resource, back off (exponential, jittered) and start again. Same face as MuxerOutput:
`submit`, `run`, `close`, `status`, and the same metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from urllib.parse import urljoin

import aiohttp
from aiortc import RTCPeerConnection, RTCSessionDescription

from broadcaster.backoff import Backoff
from broadcaster.metrics import Metrics
from broadcaster.outputs.rate import ByteRate
from broadcaster.packets import OPUS, VIDEO, EncodedPacket
from broadcaster.redact import redact_url
from broadcaster.settings import IceServerSettings, WhipOutputSettings
from broadcaster.webrtc import (
    AUDIO_QUEUE_PACKETS,
    SDP,
    VIDEO_QUEUE_PACKETS,
    EncodedTrack,
    OpusSwitch,
    PacketConverter,
    add_send_transceivers,
    last_report_age,
    rtc_configuration,
)

log = logging.getLogger(__name__)

STABLE_SECONDS = 30.0  # a session that lasted this long resets the backoff
HTTP_TIMEOUT_S = 10.0


class WhipError(Exception):
    """The ingest refused or could not be reached."""


class WhipOutput:
    """One WHIP push, kept up until `close()`."""

    def __init__(self, name: str, settings: WhipOutputSettings, encoder: OpusSwitch, metrics: Metrics,
                 ice_servers: list[IceServerSettings] | None = None, backoff: Backoff | None = None):
        self.name = name
        self.settings = settings
        self.encoder = encoder
        self.metrics = metrics
        self.ice_servers = list(ice_servers or [])
        self.backoff = backoff or Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self._converter = PacketConverter(encoder.video_time_base, lambda: encoder.video_headers)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tracks: tuple[EncodedTrack, EncodedTrack] | None = None  # set while connected
        self._closing = asyncio.Event()
        self.connected = False
        self.reconnects = 0
        self.watchdog_kills = 0
        self.last_error = ""
        self.packets = 0
        self._past_packets = 0  # packets and bytes sent by earlier sessions
        self._past_bytes = 0
        self._report_age: float | None = None
        self._rate = ByteRate()
        self.metrics.output_connected.labels(name).set(0)
        self.metrics.output_reconnects.labels(name)
        self.metrics.output_watchdog_kills.labels(name)

    @property
    def shown_destination(self) -> str:
        """The URL as it may appear in logs and status (secret path parts redacted)."""
        return redact_url(self.settings.url)

    # -- the pacer side (clock thread) -------------------------------------------------

    def submit(self, packet: EncodedPacket) -> None:
        """Pacer sink: never blocks; drops everything while not connected."""
        if self._tracks is None or packet.stream not in (VIDEO, OPUS) or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed at shutdown
            self._loop.call_soon_threadsafe(self._dispatch, packet)

    def _dispatch(self, packet: EncodedPacket) -> None:
        tracks = self._tracks
        if tracks is None:
            return
        track = tracks[0] if packet.stream == VIDEO else tracks[1]
        dropped = track.offer(self._converter.convert(packet), packet.keyframe)
        if dropped:
            self.metrics.output_dropped_packets.labels(self.name).inc(dropped)

    # -- the session loop ----------------------------------------------------------------

    async def run(self) -> None:
        """Keep a WHIP session up until `close()`."""
        self._loop = asyncio.get_running_loop()
        self.encoder.want_opus(f"whip:{self.name}", True)
        first = True
        try:
            while not self._closing.is_set():
                if not first:
                    self.reconnects += 1
                    self.metrics.output_reconnects.labels(self.name).inc()
                    delay = self.backoff.next_delay()
                    log.info("output %s: reconnecting in %.1fs", self.name, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), delay)
                    if self._closing.is_set():
                        break
                first = False
                started = time.monotonic()
                try:
                    await self._session()
                except Exception as exc:  # any failure ends this session only, never the service
                    if self._closing.is_set():
                        break
                    self.last_error = self._describe(exc)
                    log.warning("output %s: %s", self.name, self.last_error)
                if time.monotonic() - started > STABLE_SECONDS:
                    self.backoff.reset()
        finally:
            self.encoder.want_opus(f"whip:{self.name}", False)

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return text.replace(self.settings.url, self.shown_destination)

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        if self.settings.bearer_token:
            headers["Authorization"] = f"Bearer {self.settings.bearer_token}"
        return headers

    async def _session(self) -> None:
        pc = RTCPeerConnection(rtc_configuration(self.ice_servers))
        video = EncodedTrack("video", VIDEO_QUEUE_PACKETS)
        audio = EncodedTrack("audio", AUDIO_QUEUE_PACKETS)
        resource: str | None = None
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                add_send_transceivers(pc, video, audio)
                await pc.setLocalDescription(await pc.createOffer())
                async with http.post(self.settings.url, data=pc.localDescription.sdp.encode(),
                                     headers=self._headers(SDP)) as response:
                    body = await response.text()
                    if response.status not in (200, 201):
                        raise WhipError(f"POST answered {response.status}: {body[:200].strip()}")
                    location = response.headers.get("Location")
                    resource = urljoin(self.settings.url, location) if location else None
                await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
                try:
                    await self._wait_connected(pc)
                    self._set_connected(True)
                    self.last_error = ""
                    log.info("output %s: WHIP session up -> %s", self.name, self.shown_destination)
                    video.restart_at_keyframe()
                    self._tracks = (video, audio)
                    await self._watch(pc, video, audio)
                finally:
                    self._tracks = None
                    self._set_connected(False)
                    if resource is not None:
                        await self._delete(http, resource)
        finally:
            self._past_packets += video.packets + audio.packets
            self._past_bytes += video.bytes + audio.bytes
            video.stop()
            audio.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pc.close(), 5)

    async def _wait_connected(self, pc: RTCPeerConnection) -> None:
        deadline = time.monotonic() + self.settings.connect_timeout_s
        while pc.connectionState != "connected":
            if pc.connectionState in ("failed", "closed"):
                raise WhipError(f"ICE/DTLS connection {pc.connectionState}")
            if time.monotonic() > deadline:
                raise WhipError(f"not connected after {self.settings.connect_timeout_s:g}s (ICE/DTLS)")
            if self._closing.is_set():
                raise WhipError("closing")
            await asyncio.sleep(0.05)

    async def _watch(self, pc: RTCPeerConnection, video: EncodedTrack, audio: EncodedTrack) -> None:
        """Until closing or the session dies; samples the bitrate and receiver reports."""
        connected_at = time.monotonic()
        watchdog = self.settings.watchdog_seconds
        next_check = connected_at + 0.5
        while not self._closing.is_set():
            if pc.connectionState in ("failed", "closed"):
                raise WhipError(f"ICE/DTLS connection {pc.connectionState}")
            now = time.monotonic()
            self.packets = self._past_packets + video.packets + audio.packets
            self._rate.sample(now, self._past_bytes + video.bytes + audio.bytes)
            if now >= next_check:
                next_check = now + 0.5
                self._report_age = age = await last_report_age(pc)
                silent = (now - connected_at) if age is None else age
                if silent > watchdog:
                    self.watchdog_kills += 1
                    self.metrics.output_watchdog_kills.labels(self.name).inc()
                    raise WhipError(f"no RTCP receiver report for {silent:.1f}s; session dropped")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), 0.1)

    async def _delete(self, http: aiohttp.ClientSession, resource: str) -> None:
        """End the session at the ingest; best effort (it may be the one that died)."""
        try:
            async with http.delete(resource, headers=self._headers(),
                                   timeout=aiohttp.ClientTimeout(total=2)) as response:
                log.info("output %s: WHIP session deleted (%d)", self.name, response.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.info("output %s: DELETE failed (%s)", self.name, type(exc).__name__)

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        self.metrics.output_connected.labels(self.name).set(1 if value else 0)

    @property
    def bitrate_kbps(self) -> float:
        """Bytes handed to RTP over the last couple of seconds, as kbit/s."""
        return self._rate.kbps() if self.connected else 0.0

    def status(self) -> dict:
        """Status for /healthz and the panel (the MuxerOutput shape)."""
        age = self._report_age
        return {
            "kind": "whip",
            "destination": self.shown_destination,
            "connected": self.connected,
            "reconnects": self.reconnects,
            "watchdog_kills": self.watchdog_kills,
            "bitrate_kbps": round(self.bitrate_kbps, 1),
            "packets": self.packets,
            "pid": None,
            "last_error": self.last_error,
            "heartbeat_age_s": round(age, 2) if age is not None and self.connected else None,
            "alive": bool(self.connected and age is not None and age < self.settings.watchdog_seconds),
        }

    async def close(self) -> None:
        """End the session (DELETE at the ingest); `run()` returns once done."""
        self._closing.set()
