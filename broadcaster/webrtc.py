"""WebRTC from the one encode: the WHEP viewer endpoint, and the pieces WHIP push shares.

Nothing is encoded per peer. The shared H.264 packets (and the Opus packets the encoder
adds while a WebRTC consumer exists) reach aiortc as `av.Packet`s from a
`MediaStreamTrack`: aiortc's `RTCRtpSender` then calls its codec's `pack()` (RTP
packetization: H.264 STAP-A/FU-A, Opus as is) instead of `encode()`.

Threads: the pacer calls `WhepHub.submit` on its clock thread. It never blocks: with no
viewer it returns at once; otherwise it hands the packet to the event loop
(`call_soon_threadsafe`), which converts it once and offers it to every viewer's bounded
queue. A viewer that falls behind loses packets (video: up to the next keyframe), never
the clock, the other viewers or the outputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

import av
from aiohttp import web
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import candidate_from_sdp
from prometheus_client import Counter, Gauge

from broadcaster.audio import SAMPLE_RATE
from broadcaster.metrics import Metrics
from broadcaster.packets import OPUS, VIDEO, EncodedPacket
from broadcaster.settings import IceServerSettings, ServerSettings

log = logging.getLogger(__name__)

VIDEO_QUEUE_PACKETS = 64  # about 4 s of frames at 16 fps: a viewer further behind skips to a keyframe
AUDIO_QUEUE_PACKETS = 100  # 2 s of 20 ms Opus packets
CONNECT_TIMEOUT_S = 30.0  # a viewer that has not connected by then is dropped (frees its slot)
VIEWER_SILENT_S = 15.0  # no RTCP receiver report from a connected viewer this long -> dropped
OPUS_TIME_BASE = Fraction(1, SAMPLE_RATE)
SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"

_NAL_FILLER = 12
_NAL_SPS = 7
_START = b"\x00\x00\x00\x01"


def _codec_preferences(kind: str, mime_types: Sequence[str]) -> list:
    """aiortc's capabilities for `kind`, restricted to `mime_types` in that order (RTX kept last)."""
    caps = RTCRtpSender.getCapabilities(kind).codecs
    chosen = []
    for mime in mime_types:
        chosen += [c for c in caps if c.mimeType.lower() == mime]
    return chosen


# Only H.264 (packetization-mode 1; Constrained Baseline first) and Opus: what the one encode makes.
H264_PREFERENCES = sorted(
    _codec_preferences("video", ["video/h264", "video/rtx"]),
    key=lambda c: (c.mimeType.lower() == "video/rtx", c.parameters.get("profile-level-id") != "42e01f"),
)
OPUS_PREFERENCES = _codec_preferences("audio", ["audio/opus"])


def nal_units(data: bytes) -> list[bytes]:
    """The NAL units of an Annex-B access unit (start codes removed)."""
    units: list[bytes] = []
    starts: list[tuple[int, int]] = []  # (start-code offset, payload offset)
    i = 0
    while (j := data.find(b"\x00\x00\x01", i)) >= 0:
        starts.append((j - 1 if j > 0 and data[j - 1] == 0 else j, j + 3))
        i = j + 3
    for k, (_, payload) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(data)
        if end > payload:
            units.append(data[payload:end])
    return units


def prepare_video(data: bytes, keyframe: bool, headers: bytes) -> bytes:
    """An access unit fit for RTP: filler NAL units dropped, SPS/PPS put in front of a keyframe.

    x264's CBR (`nal-hrd=cbr`) pads with filler data that RTMP ingests want and WebRTC
    only pays for. x264 repeats SPS/PPS at keyframes (`repeat-headers`); an encoder that
    keeps them in extradata gets `headers` prepended, so a viewer can start at any keyframe.
    """
    units = nal_units(data)
    kept = [u for u in units if u[0] & 0x1F != _NAL_FILLER]
    prefix = b""
    if keyframe and headers and not any(u[0] & 0x1F == _NAL_SPS for u in kept):
        prefix = headers
    if len(kept) == len(units) and not prefix:
        return data
    return prefix + b"".join(_START + u for u in kept)


class PacketConverter:
    """EncodedPacket -> av.Packet for aiortc, done once per packet whatever the number of peers."""

    def __init__(self, video_time_base: Fraction, headers: Callable[[], bytes]):
        self.video_time_base = video_time_base
        self._headers = headers

    def convert(self, packet: EncodedPacket) -> av.Packet:
        """The packet aiortc's `pack()` takes: payload, pts and time base (Annex-B for H.264)."""
        if packet.stream == VIDEO:
            media = av.Packet(prepare_video(packet.data, packet.keyframe, self._headers()))
            media.time_base = self.video_time_base
        else:
            media = av.Packet(packet.data)
            media.time_base = OPUS_TIME_BASE
        media.pts = media.dts = packet.pts
        return media


class EncodedTrack(MediaStreamTrack):
    """A track whose `recv()` returns pre-encoded packets from a bounded queue (one per peer)."""

    def __init__(self, kind: str, capacity: int):
        super().__init__()
        self.kind = kind
        self._queue: asyncio.Queue[av.Packet | None] = asyncio.Queue(capacity)
        self.waiting_for_keyframe = kind == "video"
        self.packets = 0
        self.bytes = 0
        self.dropped = 0

    def offer(self, packet: av.Packet, keyframe: bool) -> int:
        """Queue without waiting (event-loop thread); returns how many packets were dropped."""
        if self.readyState != "live":
            return 0
        if self.waiting_for_keyframe:
            if not keyframe:
                return 0
            self.waiting_for_keyframe = False
        try:
            self._queue.put_nowait(packet)
            return 0
        except asyncio.QueueFull:
            dropped = 1
            if self.kind == "video":  # the backlog is stale: skip to the next keyframe
                dropped += self._clear()
                self.waiting_for_keyframe = True
            self.dropped += dropped
            return dropped

    def restart_at_keyframe(self) -> None:
        """Forget what is queued; deliver again from the next keyframe (video) or packet (audio)."""
        self._clear()
        self.waiting_for_keyframe = self.kind == "video"

    def _clear(self) -> int:
        count = 0
        while not self._queue.empty():
            self._queue.get_nowait()
            count += 1
        return count

    async def recv(self) -> av.Packet:
        """The next packet, for aiortc's RTP sender."""
        if self.readyState != "live":
            raise MediaStreamError
        packet = await self._queue.get()
        if packet is None:
            raise MediaStreamError
        self.packets += 1
        self.bytes += packet.size
        return packet

    def stop(self) -> None:
        """End the track; a pending `recv()` wakes up and ends too."""
        if self.readyState == "live":
            super().stop()
            self._clear()
            self._queue.put_nowait(None)


def rtc_configuration(ice_servers: Sequence[IceServerSettings]) -> RTCConfiguration:
    """Peer-connection settings: the configured STUN/TURN servers, or none (never a public default)."""
    return RTCConfiguration(iceServers=[
        RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in ice_servers
    ])


def add_send_transceivers(pc: RTCPeerConnection, video: EncodedTrack,
                          audio: EncodedTrack) -> tuple[RTCRtpTransceiver, RTCRtpTransceiver]:
    """Send-only H.264 and Opus transceivers: negotiation can only pick what the encode makes."""
    video_t = pc.addTransceiver(video, direction="sendonly")
    video_t.setCodecPreferences(H264_PREFERENCES)
    audio_t = pc.addTransceiver(audio, direction="sendonly")
    audio_t.setCodecPreferences(OPUS_PREFERENCES)
    return video_t, audio_t


async def last_report_age(pc: RTCPeerConnection) -> float | None:
    """Seconds since the peer's latest RTCP receiver report about our media (None: none yet)."""
    newest = None
    for sender in pc.getSenders():
        with contextlib.suppress(Exception):  # a sender being torn down
            for stats in (await sender.getStats()).values():
                if stats.type == "remote-inbound-rtp" and (newest is None or stats.timestamp > newest):
                    newest = stats.timestamp
    if newest is None:
        return None
    return max(0.0, time.time() - newest.timestamp())


def allow_loopback_candidates() -> None:
    """Make aioice (aiortc's ICE) offer 127.0.0.1 as a host candidate; it leaves loopback out.

    Process-wide, for same-machine use (tests, a browser on the same host with
    `--allow-loopback-in-peer-connection`). Set by `server.ice_loopback`.
    """
    import aioice.ice

    current = aioice.ice.get_host_addresses
    if getattr(current, "promptcast_loopback", False):
        return

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        addresses = current(use_ipv4, use_ipv6)
        if use_ipv4 and "127.0.0.1" not in addresses:
            addresses.append("127.0.0.1")
        return addresses

    get_host_addresses.promptcast_loopback = True  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = get_host_addresses


def parse_sdpfrag(text: str) -> tuple[str | None, list[tuple[str | None, int, str]], bool]:
    """A trickle-ICE SDP fragment (RFC 8840): (ice-ufrag, [(mid, m-line index, candidate)], end)."""
    ufrag = None
    candidates: list[tuple[str | None, int, str]] = []
    end = False
    mid: str | None = None
    index = -1
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("m="):
            index += 1
            mid = None
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
        elif line.startswith("a=ice-ufrag:"):
            ufrag = line[len("a=ice-ufrag:"):]
        elif line.startswith("a=candidate:"):
            candidates.append((mid, max(index, 0), line[len("a=candidate:"):]))
        elif line == "a=end-of-candidates":
            end = True
    return ufrag, candidates, end


def _ice_ufrag(sdp: str) -> str | None:
    for line in sdp.splitlines():
        if line.startswith("a=ice-ufrag:"):
            return line[len("a=ice-ufrag:"):].strip()
    return None


def _link_header(ice_servers: Sequence[IceServerSettings]) -> str:
    """ICE servers as WHEP `Link` header values (rel="ice-server")."""
    links = []
    for server in ice_servers:
        for url in [server.urls] if isinstance(server.urls, str) else server.urls:
            link = f'<{url}>; rel="ice-server"'
            if server.username:
                link += f'; username="{server.username}"; credential="{server.credential or ""}"'
                link += '; credential-type="password"'
            links.append(link)
    return ", ".join(links)


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers)


async def _sdp_text(request: web.Request) -> str | web.Response:
    """The body as SDP text, or the 400 saying why it is not (binary, not UTF-8)."""
    raw = await request.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _error(400, "the SDP is not UTF-8 text")
    if any(ord(c) < 32 and c not in "\r\n\t" for c in text):
        return _error(400, "the SDP contains control characters")
    return text


class OpusSwitch(Protocol):
    """What the hub and WHIP outputs need of the encoder (`StreamEncoder` has it)."""

    video_time_base: Fraction

    @property
    def video_headers(self) -> bytes: ...

    def want_opus(self, owner: str, wanted: bool) -> None: ...


@dataclass
class _Viewer:
    id: str
    pc: RTCPeerConnection
    video: EncodedTrack
    audio: EncodedTrack | None
    remote: str
    created: float = field(default_factory=time.monotonic)
    connected_at: float | None = None
    state: str = "new"
    watch: asyncio.Task | None = None

    def status(self) -> dict:
        now = time.monotonic()
        return {
            "id": self.id[:6],  # the full id is the capability to PATCH/DELETE the session
            "state": self.state,  # the viewer's address stays in the log, off the token-free /healthz
            "age_s": round(now - self.created, 1),
            "connected_s": round(now - self.connected_at, 1) if self.connected_at else None,
            "video_packets": self.video.packets,
            "audio_packets": self.audio.packets if self.audio else 0,
            "dropped_packets": self.video.dropped + (self.audio.dropped if self.audio else 0),
            "waiting_for_keyframe": self.video.waiting_for_keyframe,
        }


class WhepHub:
    """The WHEP endpoint (`POST /whep`, `PATCH`/`DELETE /whep/<id>`) and its viewers.

    Register `submit` as a pacer sink and call `add_routes(app)` before the app starts.
    """

    def __init__(self, settings: ServerSettings, encoder: OpusSwitch, metrics: Metrics):
        self.max_viewers = settings.whep_max_viewers
        self.pending_per_client = settings.whep_pending_per_client
        self.ice_servers = list(settings.ice_servers)
        self._encoder = encoder
        self._converter = PacketConverter(encoder.video_time_base, lambda: encoder.video_headers)
        self._viewers: dict[str, _Viewer] = {}
        self._live = 0  # connected viewers; the pacer thread reads it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        r = metrics.registry
        self._gauge = Gauge("promptcast_whep_viewers", "WHEP viewers connected", registry=r)
        self._refused = Counter("promptcast_whep_refused", "WHEP offers refused, by reason", ["reason"],
                                registry=r)
        self._dropped = Counter("promptcast_whep_dropped_packets",
                                "Packets WHEP viewers could not take in time", registry=r)
        if settings.ice_loopback:
            allow_loopback_candidates()

    # -- the pacer side (clock thread) -------------------------------------------------

    def submit(self, packet: EncodedPacket) -> None:
        """Pacer sink: never blocks; a no-op without connected viewers."""
        if not self._live or packet.stream not in (VIDEO, OPUS):
            return
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us at shutdown
            loop.call_soon_threadsafe(self._dispatch, packet)

    def _dispatch(self, packet: EncodedPacket) -> None:
        try:
            media = self._converter.convert(packet)
        except (ValueError, av.FFmpegError):
            log.exception("whep: unusable packet dropped")
            return
        dropped = 0
        for viewer in self._viewers.values():
            if viewer.connected_at is None:
                continue
            track = viewer.video if packet.stream == VIDEO else viewer.audio
            if track is not None:
                dropped += track.offer(media, packet.keyframe)
        if dropped:
            self._dropped.inc(dropped)

    # -- HTTP ----------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """Register the WHEP routes (CORS preflight is the app's middleware's job)."""
        app.router.add_post("/whep", self.post)
        app.router.add_patch("/whep/{id}", self.patch)
        app.router.add_delete("/whep/{id}", self.delete)
        app.on_shutdown.append(lambda _app: self.close())

    async def post(self, request: web.Request) -> web.Response:
        """An SDP offer in, 201 + SDP answer + Location out."""
        self._loop = asyncio.get_running_loop()
        if request.content_type != SDP:
            return _error(415, f"Content-Type must be {SDP}")
        if self._closing:
            return _error(503, "shutting down")
        if len(self._viewers) >= self.max_viewers:
            self._refused.labels("full").inc()
            reason = (f"viewer limit reached ({self.max_viewers}, server.whep_max_viewers)"
                      if self.max_viewers else "WHEP viewing is off (server.whep_max_viewers: 0)")
            return _error(503, reason, {"Retry-After": "10"})
        remote = request.remote or "?"
        pending = sum(1 for v in self._viewers.values() if v.connected_at is None and v.remote == remote)
        if pending >= self.pending_per_client:
            # Offers that never connect hold a slot for CONNECT_TIMEOUT_S: one address gets only a few.
            self._refused.labels("pending").inc()
            return _error(429, f"{pending} offers from this address have not connected yet "
                               f"(server.whep_pending_per_client)", {"Retry-After": "10"})
        offer = await _sdp_text(request)
        if isinstance(offer, web.Response):
            return offer
        viewer_id = secrets.token_urlsafe(16)
        pc = RTCPeerConnection(rtc_configuration(self.ice_servers))
        video = EncodedTrack("video", VIDEO_QUEUE_PACKETS)
        audio = EncodedTrack("audio", AUDIO_QUEUE_PACKETS)
        viewer = _Viewer(viewer_id, pc, video, audio, remote)
        self._viewers[viewer_id] = viewer  # holds the slot from now on
        self._encoder.want_opus("whep", True)
        try:
            video_t, audio_t = add_send_transceivers(pc, video, audio)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            if video_t.mid is None:
                raise ValueError("the offer has no video section")
            if audio_t.mid is None:
                audio.stop()
                viewer.audio = None
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc raises ValueError, OperationError, InvalidAccessError...
            await self._remove(viewer_id, "refused")
            self._refused.labels("offer").inc()
            reason = str(exc) or type(exc).__name__
            if "send parameters" in reason and "video" in reason:
                reason = "the offer has no H.264 (packetization-mode=1, Constrained Baseline) video codec"
            return _error(400, f"unusable SDP offer: {reason}")
        pc.on("connectionstatechange", lambda: self._state_changed(viewer))
        viewer.watch = asyncio.create_task(self._watch(viewer), name=f"whep-{viewer_id[:6]}")
        log.info("whep: viewer %s from %s (%d/%d)", viewer_id[:6], viewer.remote, len(self._viewers),
                 self.max_viewers)
        headers = {"Location": f"/whep/{viewer_id}", "Content-Type": SDP}
        if self.ice_servers:
            headers["Link"] = _link_header(self.ice_servers)
        return web.Response(status=201, body=pc.localDescription.sdp.encode(), headers=headers)

    async def patch(self, request: web.Request) -> web.Response:
        """Trickle ICE: remote candidates as an SDP fragment; ICE restarts are not supported (422)."""
        viewer = self._viewers.get(request.match_info["id"])
        if viewer is None:
            return _error(404, "no such WHEP session")
        if request.content_type != SDPFRAG:
            return _error(415, f"Content-Type must be {SDPFRAG}")
        fragment = await _sdp_text(request)
        if isinstance(fragment, web.Response):
            return fragment
        ufrag, candidates, end = parse_sdpfrag(fragment)
        remote = viewer.pc.remoteDescription
        if ufrag is not None and remote is not None and ufrag != _ice_ufrag(remote.sdp):
            return _error(422, "ICE restarts are not supported; start a new session")
        mids = [t.mid for t in viewer.pc.getTransceivers() if t.mid is not None]
        try:
            for mid, index, line in candidates:
                candidate = candidate_from_sdp(line)
                candidate.sdpMid = mid if mid is not None else (mids[0] if mids else None)
                candidate.sdpMLineIndex = index
                await viewer.pc.addIceCandidate(candidate)
            if end:
                await viewer.pc.addIceCandidate(None)
        except (ValueError, IndexError) as exc:
            return _error(400, f"unusable candidate: {exc}")
        return web.Response(status=204)

    async def delete(self, request: web.Request) -> web.Response:
        """End a viewer's session."""
        viewer_id = request.match_info["id"]
        if viewer_id not in self._viewers:
            return _error(404, "no such WHEP session")
        await self._remove(viewer_id, "deleted")
        return web.Response(status=200)

    # -- viewer lifecycle ----------------------------------------------------------------

    async def _state_changed(self, viewer: _Viewer) -> None:
        state = viewer.pc.connectionState
        viewer.state = state
        if state == "connected" and viewer.connected_at is None:
            viewer.connected_at = time.monotonic()
            viewer.video.restart_at_keyframe()
            log.info("whep: viewer %s connected", viewer.id[:6])
        elif state in ("failed", "closed"):
            await self._remove(viewer.id, state)
        self._recount()

    async def _watch(self, viewer: _Viewer) -> None:
        """Drop a viewer that never connects, or that stopped sending receiver reports."""
        while viewer.id in self._viewers:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            if viewer.connected_at is None:
                if now - viewer.created > CONNECT_TIMEOUT_S:
                    await self._remove(viewer.id, "never connected")
                    return
                continue
            if now - viewer.connected_at > VIEWER_SILENT_S:
                age = await last_report_age(viewer.pc)
                if age is None or age > VIEWER_SILENT_S:
                    await self._remove(viewer.id, "no receiver reports")
                    return

    async def _remove(self, viewer_id: str, why: str) -> None:
        viewer = self._viewers.pop(viewer_id, None)
        if viewer is None:
            return
        self._recount()
        if not self._viewers:
            self._encoder.want_opus("whep", False)
        if viewer.watch is not None and viewer.watch is not asyncio.current_task():
            viewer.watch.cancel()
        viewer.video.stop()
        if viewer.audio is not None:
            viewer.audio.stop()
        try:
            await asyncio.wait_for(viewer.pc.close(), 5)
        except Exception as exc:  # a peer connection that will not close cleanly is still gone
            log.debug("whep: closing %s: %r", viewer_id[:6], exc)
        log.info("whep: viewer %s gone (%s); %d left", viewer_id[:6], why, len(self._viewers))

    def _recount(self) -> None:
        self._live = sum(1 for v in self._viewers.values() if v.connected_at is not None)
        self._gauge.set(self._live)

    async def close(self) -> None:
        """End every session (shutdown)."""
        self._closing = True
        await asyncio.gather(*(self._remove(v, "shutdown") for v in list(self._viewers)))

    def status(self) -> dict:
        """For /healthz: how many viewers, and each one's state."""
        return {
            "viewers": self._live,
            "sessions": len(self._viewers),
            "max_viewers": self.max_viewers,
            "opus": bool(getattr(self._encoder, "opus_enabled", False)),
            "viewer_sessions": [v.status() for v in self._viewers.values()],
        }
