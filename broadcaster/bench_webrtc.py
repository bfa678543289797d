"""`promptcast bench webrtc`: what each WHEP viewer costs the broadcaster process.

A `WhepHub` in this process is fed real encoded packets (preview-engine content, H.264 +
Opus, encoded once up front and replayed on the output clock by a pacer-like thread).
N aiortc viewers connect over loopback from a helper process, so what they cost is not
billed to the hub; they reassemble frames (SRTP, jitter buffer, depacketization) but do
not decode them, so ten of them fit beside the hub on a 2-core machine. Reported: this
process's CPU time over the measured seconds, per second of stream, in total and per viewer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import threading
import time
from fractions import Fraction

from aiohttp import web

from broadcaster.bench import _source_frames, machine
from broadcaster.encoder import StreamEncoder
from broadcaster.metrics import Metrics
from broadcaster.packets import OPUS, VIDEO, EncodedPacket
from broadcaster.settings import EncoderSettings, ServerSettings
from broadcaster.webrtc import WhepHub

_CTX = mp.get_context("spawn")
LOOP_SECONDS = 8  # replayed content: 4 GOPs


class _Replayed:
    """The encoder face the hub needs, for packets that were encoded beforehand."""

    def __init__(self, video_time_base: Fraction, headers: bytes):
        self.video_time_base = video_time_base
        self.video_headers = headers

    def want_opus(self, owner: str, wanted: bool) -> None:
        """Opus was encoded up front; nothing to switch."""


def _encode(width: int, height: int, fps: int, kbps: int) -> tuple[list[list[EncodedPacket]], StreamEncoder]:
    """LOOP_SECONDS of output frames, each tick's packets (video + Opus) as the pacer would submit them."""
    settings = EncoderSettings(video_bitrate_kbps=kbps, codec="libx264", threads=1)
    encoder = StreamEncoder(settings, width, height, fps)
    encoder.want_opus("bench", True)
    src = _source_frames(width, height, 48)
    ticks = []
    for i in range(LOOP_SECONDS * fps):
        packets = encoder.encode(src[i % len(src)], i)
        ticks.append([p for p in packets if p.stream in (VIDEO, OPUS)])
    return ticks, encoder


def _replay(hub: WhepHub, ticks: list[list[EncodedPacket]], fps: int, stop: threading.Event) -> None:
    """Submit the ticks on a 1/fps clock forever, timestamps continuing across loops."""
    start = time.perf_counter()
    index = 0
    opus_per_tick = 48000 // fps
    while not stop.is_set():
        cycle, at = divmod(index, len(ticks))
        for packet in ticks[at]:
            shift = cycle * len(ticks) * (1 if packet.stream == VIDEO else opus_per_tick)
            if shift:
                packet = dataclasses.replace(packet, pts=packet.pts + shift, dts=packet.dts + shift)
            hub.submit(packet)
        index += 1
        delay = start + index / fps - time.perf_counter()
        if delay > 0:
            stop.wait(delay)


class _FrameCounter:
    """Stands in for aiortc's decoders in the helper: counts each reassembled video frame."""

    frames = 0

    def __init__(self, video: bool):
        self.video = video

    def decode(self, encoded_frame) -> list:
        if self.video:
            _FrameCounter.frames += 1  # one decoder thread per viewer; the GIL keeps += whole enough
        return []


def _viewers_process(url: str, count: int, conn) -> None:
    """Helper process: `count` aiortc WHEP viewers; 'ready' once all receive, frame count on 'stop'."""
    import aioice.ice
    import aiortc.rtcrtpreceiver

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else []
    aiortc.rtcrtpreceiver.get_decoder = lambda codec: _FrameCounter(codec.mimeType.startswith("video/"))
    asyncio.run(_viewers(url, count, conn))


async def _viewers(url: str, count: int, conn) -> None:
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pcs: list[RTCPeerConnection] = []
    resources: list[str] = []

    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(url, data=pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as response:
                if response.status != 201:
                    conn.send(("error", f"POST {response.status}: {await response.text()}"))
                    return
                resources.append(response.headers["Location"])
                answer = await response.text()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            pcs.append(pc)
        deadline = time.monotonic() + 30
        # Every viewer connected, and frames arriving for all of them (they start at a keyframe).
        while any(pc.connectionState != "connected" for pc in pcs) or _FrameCounter.frames < 3 * count:
            if time.monotonic() > deadline:
                conn.send(("error", f"viewers not all receiving after 30 s ({_FrameCounter.frames} frames)"))
                return
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        conn.send(("ready", _FrameCounter.frames))
        while not conn.poll():
            await asyncio.sleep(0.1)
        conn.recv()
        conn.send(("frames", _FrameCounter.frames))
        base = url.rsplit("/whep", 1)[0]
        for resource in resources:
            async with http.delete(base + resource):
                pass
    for pc in pcs:
        await pc.close()


async def _measure(ticks, encoder: StreamEncoder, fps: int, viewers: int, seconds: float) -> dict:
    hub = WhepHub(ServerSettings(whep_max_viewers=max(1, viewers), ice_loopback=True),
                  _Replayed(encoder.video_time_base, encoder.video_headers), Metrics())
    app = web.Application()
    hub.add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/whep"
    stop = threading.Event()
    feeder = threading.Thread(target=_replay, args=(hub, ticks, fps, stop), daemon=True)
    feeder.start()
    process = None
    parent = None
    at_ready = 0
    try:
        if viewers:
            parent, child = _CTX.Pipe()
            process = _CTX.Process(target=_viewers_process, args=(url, viewers, child), daemon=True)
            process.start()
            kind, detail = await asyncio.to_thread(parent.recv)
            if kind != "ready":
                raise RuntimeError(detail)
            at_ready = detail
        else:
            await asyncio.sleep(1.0)
        sent0 = _sent_bytes(hub)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        sent = _sent_bytes(hub) - sent0
        received = 0
        if parent is not None:
            parent.send("stop")
            _, after = await asyncio.to_thread(parent.recv)
            received = after - at_ready
        dropped = sum(s["dropped_packets"] for s in hub.status()["viewer_sessions"])
        return {"cpu_ms_per_s": cpu * 1000 / wall, "wall": wall, "sent_kbps": sent * 8 / 1000 / wall,
                "frames": received, "dropped": dropped}
    finally:
        stop.set()
        if process is not None:
            await asyncio.to_thread(process.join, 15)
            if process.is_alive():
                process.kill()
        await hub.close()
        await runner.cleanup()


def _sent_bytes(hub: WhepHub) -> int:
    return sum(v.video.bytes + (v.audio.bytes if v.audio else 0) for v in hub._viewers.values())


def bench_webrtc(viewers: list[int], seconds: float = 10.0, width: int = 832, height: int = 480,
                 fps: int = 16, kbps: int = 3000) -> str:
    """WHEP hub CPU for each viewer count; a table with the machine line."""
    ticks, encoder = _encode(width, height, fps, kbps)
    rows = [
        f"bench webrtc: {width}x{height} @ {fps} fps, H.264 {kbps} kbit/s CBR (filler stripped for RTP) "
        f"+ Opus 48 kHz stereo, {seconds:g} s per row; viewers: aiortc clients in a helper process on "
        "loopback (frames reassembled, not decoded)",
        f"machine: {machine()}",
        "",
        "| viewers | hub CPU ms per s of stream | per viewer (total / N) | per extra viewer (over 0) "
        "| share of a core | kbit/s sent per viewer | video fps received per viewer | dropped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    baseline = None
    for count in viewers:
        result = asyncio.run(_measure(ticks, encoder, fps, count, seconds))
        cpu = result["cpu_ms_per_s"]
        if count == 0:
            baseline = cpu
        per = f"{cpu / count:.1f}" if count else "-"
        extra = f"{(cpu - baseline) / count:.1f}" if count and baseline is not None else "-"
        kbps_each = f"{result['sent_kbps'] / count:.0f}" if count else "-"
        fps_each = f"{result['frames'] / count / result['wall']:.1f}" if count else "-"
        rows.append(f"| {count} | {cpu:.1f} | {per} | {extra} | {cpu / 10:.1f}% | {kbps_each} | {fps_each} "
                    f"| {result['dropped']} |")
    encoder.close()
    return "\n".join(rows)
