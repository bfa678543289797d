"""WHEP preview and WHIP push from the one encode: aiortc clients, headless Chromium, nginx-rtmp.

ICE on loopback: aioice leaves 127.0.0.1 out of its host candidates, so this test process
patches its host lookup (`loopback_ice`), the channel runs with `server.ice_loopback: true`,
and Chromium gets `--allow-loopback-in-peer-connection` with mDNS candidates off.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import aiohttp
import aioice.ice
import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from broadcaster.encoder import StreamEncoder
from broadcaster.metrics import Metrics
from broadcaster.outputs.muxer_output import MuxerOutput
from broadcaster.outputs.muxer_process import MuxTarget
from broadcaster.packets import AUDIO, OPUS, VIDEO, EncodedPacket
from broadcaster.settings import ConfigError, EncoderSettings, parse_settings
from broadcaster.webrtc import EncodedTrack, nal_units, parse_sdpfrag, prepare_video
from tests.channel import Channel, small_channel
from tests.servers import free_port, wait_until
from tests.whip_server import WhipServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync",
    # Loopback ICE: host candidates on 127.0.0.1, and real addresses rather than mDNS names.
    "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
]
SDP = {"Content-Type": "application/sdp"}


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def loopback_ice(monkeypatch):
    """aiortc peers in this process offer 127.0.0.1 only."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses",
                        lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else [])


async def until(predicate: Callable[[], object], timeout: float, message: str = "") -> None:
    """Poll without blocking the event loop (the aiortc clients run on it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        await asyncio.sleep(0.1)


class WhepViewer:
    """A Python aiortc WHEP client that counts the frames it decodes."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.video_frames = 0
        self.audio_frames = 0
        self.size: tuple[int, int] | None = None
        self.status = 0
        self.location = ""
        self.body = ""
        self._tasks: set[asyncio.Task] = set()
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.on("track", self._on_track)

    def _on_track(self, track) -> None:
        task = asyncio.ensure_future(self._consume(track))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _consume(self, track) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    self.video_frames += 1
                    self.size = (frame.width, frame.height)
                else:
                    self.audio_frames += 1

    async def connect(self, http: aiohttp.ClientSession) -> WhepViewer:
        """POST the offer; on 201 apply the answer (ICE + DTLS then run in the background)."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with http.post(self.endpoint, data=self.pc.localDescription.sdp, headers=SDP) as response:
            self.status = response.status
            self.location = response.headers.get("Location", "")
            self.body = await response.text()
            self.content_type = response.headers.get("Content-Type", "")
        if self.status == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=self.body, type="answer"))
        return self

    @property
    def resource(self) -> str:
        return self.endpoint.rsplit("/whep", 1)[0] + self.location

    async def delete(self, http: aiohttp.ClientSession) -> int:
        async with http.delete(self.resource) as response:
            return response.status

    async def close(self) -> None:
        await self.pc.close()


def whep_status(channel: Channel) -> dict:
    return channel.health()["whep"]


# -- units: Opus beside AAC, muxers ignore it, H.264 for RTP, trickle fragments, settings ------


def test_opus_runs_only_while_wanted_on_the_aac_sample_clock():
    settings = EncoderSettings(preset="ultrafast", video_bitrate_kbps=300, threads=1, codec="libx264")
    encoder = StreamEncoder(settings, 64, 48, 16)
    frame = np.zeros((48, 64, 3), np.uint8)
    try:
        before = [p for i in range(16) for p in encoder.encode(frame, i)]
        assert {p.stream for p in before} == {VIDEO, AUDIO}
        encoder.want_opus("whep", True)
        encoder.want_opus("whip:a", True)
        during = [p for i in range(16, 48) for p in encoder.encode(frame, i)]
        encoder.want_opus("whep", False)
        still = [p for i in range(48, 64) for p in encoder.encode(frame, i)]
        encoder.want_opus("whip:a", False)
        after = [p for i in range(64, 80) for p in encoder.encode(frame, i)]
    finally:
        encoder.close()
    opus = [p for p in during if p.stream == OPUS]
    # 2 s of audio at 20 ms; libopus holds back its look-ahead (one packet).
    assert 98 <= len(opus) <= 100
    assert all(p.duration == 960 for p in opus)
    assert all(b.pts - a.pts == 960 for a, b in itertools.pairwise(opus))
    # Started where the AAC clock stood (sample 48000 at second 1, read in 1024-sample blocks),
    # less Opus's 312-sample pre-skip.
    assert 48000 - 1024 - 312 <= opus[0].pts <= 48000
    assert any(p.stream == OPUS for p in still)  # one owner left
    assert not any(p.stream == OPUS for p in after)
    aac = [p for p in before + during + still + after if p.stream == AUDIO]
    assert len(aac) >= 5 * 48000 // 1024 - 2  # AAC untouched by all this


def test_muxer_outputs_ignore_stream_ids_they_do_not_carry():
    target = MuxTarget(name="t", kind="record", format="mp4", destination="/nonexistent")
    output = MuxerOutput(target, b"", (Fraction(1, 16), Fraction(1, 48000)), Metrics())
    output._accepting = True
    output.submit(EncodedPacket(OPUS, b"\xfc", 0, 0, 960, False))
    output.submit(EncodedPacket(VIDEO, b"\x00\x00\x01\x65", 0, 0, 1, True))
    output.submit(EncodedPacket(OPUS, b"\xfc", 960, 960, 960, False))
    output.submit(EncodedPacket(AUDIO, b"\x21", 0, 0, 1024, False))
    queued = [output._queue.get_nowait().stream for _ in range(output._queue.qsize())]
    assert queued == [VIDEO, AUDIO]


def test_h264_for_rtp_drops_filler_and_puts_headers_before_keyframes():
    sps, pps, idr, filler = b"\x67\x42\xc0", b"\x68\xce", b"\x65\x88\x84", b"\x0c" + b"\xff" * 40 + b"\x80"
    headers = b"\x00\x00\x00\x01" + sps + b"\x00\x00\x00\x01" + pps
    keyframe = b"\x00\x00\x00\x01" + idr + b"\x00\x00\x01" + filler
    out = prepare_video(keyframe, True, headers)
    assert nal_units(out) == [sps, pps, idr]
    with_headers = headers + b"\x00\x00\x00\x01" + idr
    assert prepare_video(with_headers, True, headers) == with_headers  # nothing to change: same bytes
    assert nal_units(prepare_video(b"\x00\x00\x01\x41\x9a" + b"\x00\x00\x01" + filler, False, headers)) == [
        b"\x41\x9a"]


async def test_a_slow_viewer_drops_to_the_next_keyframe_and_never_blocks():
    import av

    track = EncodedTrack("video", 4)
    packets = [(av.Packet(b"\x00\x00\x01\x65"), True)] + [(av.Packet(b"\x00\x00\x01\x41"), False)] * 6
    dropped = sum(track.offer(p, key) for p, key in packets)
    assert dropped == 5 and track.waiting_for_keyframe  # the stale backlog went with the overflow
    assert track.offer(av.Packet(b"\x00\x00\x01\x41"), False) == 0 and track._queue.empty()
    track.offer(av.Packet(b"\x00\x00\x01\x65"), True)
    assert (await track.recv()).size == 4
    track.stop()
    with pytest.raises(MediaStreamError):
        await track.recv()


def test_trickle_ice_fragment_is_parsed():
    ufrag, candidates, end = parse_sdpfrag(
        "a=ice-ufrag:EsAw\r\na=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\nm=audio 9 RTP/AVP 0\r\na=mid:0\r\n"
        "a=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0\r\n"
        "a=end-of-candidates\r\n")
    assert ufrag == "EsAw" and end
    assert candidates == [("0", 0, "1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0")]


def test_whip_output_and_ice_server_settings_are_validated():
    settings = parse_settings(
        "outputs: [{kind: whip, url: 'https://ingest.example/whip/abc', bearer_token: t}]\n"
        "server: {ice_servers: [{urls: 'stun:stun.example:3478'}, "
        "{urls: ['turn:turn.example:3478'], username: u, credential: c}], whep_max_viewers: 3}\n")
    assert settings.outputs[0].kind == "whip"
    assert settings.server.whep_max_viewers == 3 and len(settings.server.ice_servers) == 2
    with pytest.raises(ConfigError) as error:
        parse_settings("outputs: [{kind: whip, url: 'rtmp://x/y'}]\nserver: {ice_servers: [{urls: 'http://x'}]}\n")
    text = str(error.value)
    assert "outputs[0].url" in text and "server.ice_servers[0].urls" in text


# -- WHEP against a running channel ---------------------------------------------------------

PAGE = """<!doctype html><html><body>
<video id="v" autoplay muted playsinline></video>
<script>
const endpoint = "ENDPOINT";
const video = document.getElementById("v");
window.state = "starting"; window.error = null; window.painted = 0;
function count() { window.painted += 1; video.requestVideoFrameCallback(count); }
video.requestVideoFrameCallback(count);
async function start() {
  const pc = new RTCPeerConnection({iceServers: []});
  window.pc = pc;
  pc.addTransceiver("video", {direction: "recvonly"});
  pc.addTransceiver("audio", {direction: "recvonly"});
  const stream = new MediaStream();
  pc.ontrack = (e) => { stream.addTrack(e.track); video.srcObject = stream; };
  pc.onconnectionstatechange = () => { window.state = pc.connectionState; };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === "complete") resolve(); };
    setTimeout(resolve, 3000);
  });
  const r = await fetch(endpoint, {method: "POST", headers: {"Content-Type": "application/sdp"},
                                   body: pc.localDescription.sdp});
  if (r.status !== 201) throw new Error("WHEP POST " + r.status + ": " + await r.text());
  window.resource = new URL(r.headers.get("Location"), endpoint).href;
  await pc.setRemoteDescription({type: "answer", sdp: await r.text()});
}
window.decoded = () => video.getVideoPlaybackQuality().totalVideoFrames;
window.stop = async () => {
  const r = await fetch(window.resource, {method: "DELETE"});
  window.pc.close();
  return r.status;
};
start().catch((e) => { window.error = String(e); window.state = "error"; });
</script></body></html>
"""


@pytest.fixture(scope="module")
def whep_channel(tmp_path_factory):
    """One channel (no muxer outputs, two WHEP seats, CORS for the test page) for tests a, b, d."""
    tmp = tmp_path_factory.mktemp("whep")
    page_port = free_port()
    config = small_channel(tmp, [], server={
        "whep_max_viewers": 2, "ice_loopback": True, "cors_origins": [f"http://127.0.0.1:{page_port}"]})
    with Channel(tmp, config) as channel:
        yield channel, page_port


async def _no_sessions_left(channel: Channel) -> None:
    deadline = time.monotonic() + 10
    while (await asyncio.to_thread(whep_status, channel))["sessions"]:
        assert time.monotonic() < deadline, "WHEP sessions left behind"
        await asyncio.sleep(0.2)


@pytest.mark.servers
async def test_python_whep_viewer_receives_decoded_video_and_audio(whep_channel, loopback_ice):
    channel, _ = whep_channel
    async with aiohttp.ClientSession() as http:
        viewer = await WhepViewer(channel.url("/whep")).connect(http)
        try:
            assert viewer.status == 201, viewer.body
            assert viewer.location.startswith("/whep/")
            assert viewer.content_type == "application/sdp"
            assert "H264" in viewer.body and "opus" in viewer.body and "VP8" not in viewer.body
            await until(lambda: viewer.video_frames >= 3, 15, "no decoded video frame")
            first = viewer.video_frames
            await asyncio.sleep(2)
            assert viewer.video_frames >= first + 12  # 16 fps: 32 expected; slack for a busy CI machine
            assert viewer.audio_frames > 50  # Opus decoded too
            assert viewer.size == (320, 192)
            status = await asyncio.to_thread(whep_status, channel)
            assert status["viewers"] == 1 and status["opus"] is True
            session = status["viewer_sessions"][0]
            assert session["state"] == "connected" and session["video_packets"] > 20
            assert len(session["id"]) < 10  # the full id (DELETE capability) is not published
            assert (await viewer.delete(http)) == 200
        finally:
            await viewer.close()
    await _no_sessions_left(channel)
    wait_until(lambda: whep_status(channel)["opus"] is False, 5)  # no consumer: Opus stops


@pytest.mark.servers
async def test_headless_chromium_plays_the_whep_stream(whep_channel):
    playwright = pytest.importorskip("playwright.async_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not installed")
    channel, page_port = whep_channel
    app = web.Application()
    page = PAGE.replace("ENDPOINT", channel.url("/whep"))
    async def serve(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app.router.add_get("/", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", page_port).start()
    try:
        async with playwright.async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                tab = await browser.new_page()
                await tab.goto(f"http://127.0.0.1:{page_port}/")
                await tab.wait_for_function("window.state === 'connected' || window.error", timeout=20000)
                assert await tab.evaluate("window.error") is None
                await tab.wait_for_function("window.decoded() > 5", timeout=15000)
                first = await tab.evaluate("window.decoded()")
                await asyncio.sleep(2)
                second = await tab.evaluate("window.decoded()")
                painted = await tab.evaluate("window.painted")
                size = await tab.evaluate("[video.videoWidth, video.videoHeight]")
                status = await asyncio.to_thread(whep_status, channel)
                assert await tab.evaluate("window.stop()") == 200
            finally:
                await browser.close()
    finally:
        await runner.cleanup()
    assert second >= first + 12, (first, second)  # 16 fps for 2 s: 32 expected
    assert painted > 10
    assert size == [320, 192]
    assert status["viewers"] == 1 and status["viewer_sessions"][0]["state"] == "connected"
    await _no_sessions_left(channel)


@pytest.mark.servers
async def test_viewer_cap_answers_503_and_the_protocol_errors_have_reasons(whep_channel, loopback_ice):
    channel, _ = whep_channel
    endpoint = channel.url("/whep")
    async with aiohttp.ClientSession() as http:
        async with http.post(endpoint, data="v=0", headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
        async with http.post(endpoint, data="not sdp", headers=SDP) as r:
            assert r.status == 400 and "offer" in (await r.json())["error"]
        async with http.delete(channel.url("/whep/nope")) as r:
            assert r.status == 404
        viewers = [await WhepViewer(endpoint).connect(http) for _ in range(2)]
        extra = WhepViewer(endpoint)
        try:
            assert [v.status for v in viewers] == [201, 201]
            await extra.connect(http)
            assert extra.status == 503
            assert "viewer limit reached (2" in extra.body
            # Trickle ICE: candidates for the session's ICE username are taken; an ICE restart is not.
            fragment = ("a=ice-ufrag:{}\r\na=ice-pwd:x\r\nm=video 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
                        "a=candidate:1 1 udp 2122260223 127.0.0.1 9 typ host\r\na=end-of-candidates\r\n")
            ufrag = next(line.split(":", 1)[1] for line in viewers[0].pc.localDescription.sdp.splitlines()
                         if line.startswith("a=ice-ufrag:"))
            frag = {"Content-Type": "application/trickle-ice-sdpfrag"}
            resource = viewers[0].resource
            async with http.patch(resource, data=fragment.format(ufrag), headers=frag) as r:
                assert r.status == 204, await r.text()
            async with http.patch(resource, data=fragment.format("other"), headers=frag) as r:
                assert r.status == 422
            async with http.patch(resource, data=fragment, headers=SDP) as r:
                assert r.status == 415
            # A seat frees on DELETE.
            assert await viewers[1].delete(http) == 200
            assert await viewers[1].delete(http) == 404
            again = await WhepViewer(endpoint).connect(http)
            assert again.status == 201
            viewers.append(again)
            metrics = await asyncio.to_thread(channel.metrics)
        finally:
            for viewer in [*viewers, extra]:
                if viewer.status == 201:
                    with contextlib.suppress(aiohttp.ClientError):
                        await viewer.delete(http)
                await viewer.close()
    assert metrics['promptcast_whep_refused_total{reason="full"}'] >= 1
    await _no_sessions_left(channel)


@pytest.mark.servers
async def test_five_viewers_and_rtmp_one_viewer_leaving_disturbs_nobody(tmp_path, nginx_rtmp, loopback_ice):
    config = small_channel(tmp_path, [{"kind": "rtmp", "url": nginx_rtmp.url("main")}],
                           server={"ice_loopback": True})
    with Channel(tmp_path, config) as channel:
        await until(lambda: nginx_rtmp.is_publishing("main"), 20, channel.logs())
        async with aiohttp.ClientSession() as http:
            viewers = list(await asyncio.gather(*(WhepViewer(channel.url("/whep")).connect(http)
                                                  for _ in range(5))))
            try:
                assert [v.status for v in viewers] == [201] * 5
                await until(lambda: min(v.video_frames for v in viewers) >= 3, 20,
                            f"not every viewer plays: {[v.video_frames for v in viewers]}")
                assert await viewers[0].delete(http) == 200
                await viewers[0].close()
                await asyncio.sleep(0.5)
                before = [v.video_frames for v in viewers]
                await asyncio.sleep(2.5)
                after = [v.video_frames for v in viewers]
                health = await asyncio.to_thread(channel.health)
                metrics = await asyncio.to_thread(channel.metrics)
                publishing = await asyncio.to_thread(nginx_rtmp.is_publishing, "main")
            finally:
                for viewer in viewers[1:]:
                    with contextlib.suppress(aiohttp.ClientError):
                        await viewer.delete(http)
                    await viewer.close()
    assert after[0] == before[0]  # the one that left gets nothing more
    # 16 fps for 2.5 s: 40 expected each
    assert all(a >= b + 20 for a, b in zip(after[1:], before[1:], strict=True)), (before, after)
    assert health["whep"]["viewers"] == 4
    assert all(s["dropped_packets"] == 0 for s in health["whep"]["viewer_sessions"])
    assert publishing
    assert health["outputs"]["rtmp-0"]["connected"] is True
    assert metrics['promptcast_output_reconnects_total{output="rtmp-0"}'] == 0
    assert metrics.get('promptcast_output_dropped_packets_total{output="rtmp-0"}', 0) == 0


# -- WHIP push -------------------------------------------------------------------------------


@pytest.mark.servers
def test_whip_output_pushes_media_and_reconnects_after_the_ingest_dies(tmp_path):
    with WhipServer(token="s3cret-token", log_path=tmp_path / "whip.log") as ingest:
        config = small_channel(tmp_path, [
            {"kind": "whip", "url": ingest.url, "bearer_token": "s3cret-token", "watchdog_seconds": 2,
             "reconnect_min_s": 0.3, "reconnect_max_s": 1},
            {"kind": "whip", "name": "refused", "url": ingest.url, "bearer_token": "wrong",
             "reconnect_min_s": 0.5, "reconnect_max_s": 2},
        ], server={"ice_loopback": True})
        with Channel(tmp_path, config) as channel:
            wait_until(lambda: ingest.stats()["video_frames"] >= 16, 20, message=channel.logs())
            first = ingest.stats()
            health = channel.health()
            ingest.kill()
            wait_until(lambda: channel.metrics()['promptcast_output_connected{output="whip-0"}'] == 0, 10,
                       message=channel.logs())
            time.sleep(1.0)  # the output retries against a closed port meanwhile
            ingest.start()
            wait_until(lambda: ingest.stats()["video_frames"] >= 16, 30, message=channel.logs())
            second = ingest.stats()
            metrics = channel.metrics()
            refused = channel.health()["outputs"]["refused"]
        final = ingest.stats()
        logs = channel.logs()

    assert first["video_codecs"] == ["video/H264"] and first["audio_codecs"] == ["audio/opus"]
    assert first["audio_frames"] > 0
    whip = health["outputs"]["whip-0"]
    assert whip["kind"] == "whip" and whip["connected"] is True and whip["packets"] > 0
    assert whip["alive"] is True and whip["bitrate_kbps"] > 0
    assert second["sessions"] == 1 and second["audio_frames"] > 0  # a fresh ingest got a new session
    assert metrics['promptcast_output_reconnects_total{output="whip-0"}'] >= 1
    assert metrics['promptcast_output_connected{output="whip-0"}'] == 1
    assert refused["connected"] is False and "401" in refused["last_error"]
    assert final["deleted"] == 1  # a clean stop ends the session at the ingest
    assert "s3cret-token" not in logs


@pytest.mark.servers
def test_bench_webrtc_reports_cpu_per_viewer():
    from broadcaster.bench_webrtc import bench_webrtc

    table = bench_webrtc(viewers=[0, 1], seconds=1.0, width=320, height=192, kbps=600)
    rows = [line for line in table.splitlines() if line.startswith("| 1 |")]
    assert rows and "machine:" in table
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[1]) > 0 and float(cells[6]) > 8  # CPU measured; frames arrived at ~16 fps
