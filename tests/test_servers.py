"""Checks for the real local servers and ffprobe helpers in tests/servers.py."""

from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.servers import (
    BlackHoleServer,
    NginxRtmp,
    ProbeError,
    bitrate_kbps,
    free_port,
    keyframe_times,
    probe_packets,
    probe_streams,
    wait_until,
)

needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None, reason="ffmpeg/ffprobe not installed"
)

FPS = 16
GOP = 32  # frames: one keyframe every 2.0 s at 16 fps


def _push(url: str, seconds: float, log: Path) -> subprocess.Popen[bytes]:
    """Publish a real-time H.264+AAC test stream to url with the ffmpeg CLI."""
    cmd = [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-re",
        "-f", "lavfi", "-i", f"testsrc2=size=320x240:rate={FPS}",
        "-f", "lavfi", "-i", "anullsrc=r=48000:cl=stereo",
        "-c:v", "libx264", "-preset", "ultrafast", "-g", str(GOP), "-keyint_min", str(GOP),
        "-sc_threshold", "0", "-bf", "0", "-b:v", "500k",
        "-c:a", "aac", "-t", str(seconds), "-f", "flv", url,
    ]  # fmt: skip
    # A file, not a pipe: nobody reads a pipe while the test waits, and a full one would stall ffmpeg.
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_wait_until_returns_value_and_raises_with_message() -> None:
    assert wait_until(lambda: 42, timeout=1) == 42
    start = time.monotonic()
    with pytest.raises(AssertionError, match="never true"):
        wait_until(lambda: False, timeout=0.3, interval=0.05, message="never true")
    assert time.monotonic() - start < 2


def test_keyframe_times_and_bitrate_on_synthetic_packets() -> None:
    packets = [
        {"codec_type": "video", "pts_time": "0.000", "size": "1000", "flags": "K__"},
        {"codec_type": "audio", "pts_time": "0.010", "size": "300", "flags": "K__"},
        {"codec_type": "video", "pts_time": "1.000", "size": "1000", "flags": "___"},
        {"codec_type": "video", "pts_time": "N/A", "size": "0", "flags": "K__"},
        {"codec_type": "video", "pts_time": "2.000", "size": "500", "flags": "K__"},
    ]
    assert keyframe_times(packets) == [0.0, 2.0]
    assert keyframe_times(packets, "audio") == [0.01]
    assert bitrate_kbps(packets) == pytest.approx(2500 * 8 / 2.0 / 1000)
    assert bitrate_kbps(packets, "audio") == 0.0  # one packet: no span
    assert bitrate_kbps([]) == 0.0


@pytest.mark.servers
def test_nginx_start_stat_stop(nginx_rtmp: NginxRtmp) -> None:
    assert _port_open(nginx_rtmp.port)
    assert nginx_rtmp.url("abc") == f"rtmp://127.0.0.1:{nginx_rtmp.port}/live/abc"
    xml = nginx_rtmp.stat()
    assert "<nginx_rtmp_version>" in xml
    assert nginx_rtmp.streams() == {}
    assert not nginx_rtmp.is_publishing("abc")
    nginx_rtmp.stop()
    assert not nginx_rtmp.running
    assert not _port_open(nginx_rtmp.port)


@pytest.mark.servers
def test_nginx_start_failure_reports_error_log(tmp_path: Path) -> None:
    if shutil.which("nginx") is None:
        pytest.skip("nginx not installed")
    server = NginxRtmp(tmp_path)
    server.conf_path.write_text(server.conf_path.read_text() + "\nbogus_directive on;\n")
    with pytest.raises(RuntimeError, match="bogus_directive"):
        server.start()
    assert not server.running


@pytest.mark.servers
@needs_ffmpeg
def test_push_is_published_and_probed(nginx_rtmp: NginxRtmp, tmp_path: Path) -> None:
    log = tmp_path / "push.log"
    push = _push(nginx_rtmp.url("cam"), 9, log)
    try:
        wait_until(lambda: nginx_rtmp.is_publishing("cam"), 10, message=f"never published: {log.read_text()}")
        assert not nginx_rtmp.is_publishing("other")
        # Both are subscribers of the live stream, so run them side by side to save wall time.
        with ThreadPoolExecutor(2) as pool:
            streams_f = pool.submit(probe_streams, nginx_rtmp.url("cam"), 15)
            packets_f = pool.submit(probe_packets, nginx_rtmp.url("cam"), 6.5, 20)
            info, packets = streams_f.result(), packets_f.result()

        by_type = {s["codec_type"]: s for s in info["streams"]}
        assert by_type["video"]["codec_name"] == "h264"
        assert (by_type["video"]["width"], by_type["video"]["height"]) == (320, 240)
        assert by_type["audio"]["codec_name"] == "aac"
        assert int(by_type["audio"]["sample_rate"]) == 48000
        assert info["format"]["format_name"] == "flv"

        keys = keyframe_times(packets)
        assert len(keys) >= 3, keys
        for a, b in itertools.pairwise(keys):
            assert b - a == pytest.approx(GOP / FPS, abs=0.1), keys
        assert 250 < bitrate_kbps(packets) < 1000
        assert any(p["codec_type"] == "audio" for p in packets)

        assert push.wait(10) == 0, log.read_text()
        wait_until(lambda: not nginx_rtmp.is_publishing("cam"), 5, message="still publishing after the end")
    finally:
        _stop(push)


@pytest.mark.servers
@needs_ffmpeg
def test_kill_mid_stream_then_restart_on_same_port(nginx_rtmp: NginxRtmp, tmp_path: Path) -> None:
    port = nginx_rtmp.port
    first = _push(nginx_rtmp.url(), 30, tmp_path / "first.log")
    try:
        wait_until(nginx_rtmp.is_publishing, 10, message="first push never published")
        nginx_rtmp.kill()
        assert not nginx_rtmp.running
        assert not _port_open(port)
        # The publisher must notice the crash (broken pipe) rather than keep going.
        assert first.wait(10) != 0
    finally:
        _stop(first)

    nginx_rtmp.restart()
    assert nginx_rtmp.port == port
    assert not nginx_rtmp.is_publishing()
    log = tmp_path / "second.log"
    second = _push(nginx_rtmp.url(), 2, log)
    try:
        wait_until(nginx_rtmp.is_publishing, 10, message=f"second push never published: {log.read_text()}")
        assert second.wait(10) == 0, log.read_text()
    finally:
        _stop(second)


def test_black_hole_accepts_tcp_and_stays_silent() -> None:
    with BlackHoleServer() as hole:
        assert hole.url("k") == f"rtmp://127.0.0.1:{hole.port}/live/k"
        with socket.create_connection(("127.0.0.1", hole.port), timeout=2) as conn:
            conn.sendall(b"\x03" + b"\0" * 1536)
            conn.settimeout(0.3)
            with pytest.raises(TimeoutError):
                conn.recv(1)
            wait_until(lambda: hole.connections == 1, 2)
            wait_until(lambda: hole.bytes_received == 1537, 2)
    assert not _port_open(hole.port)


@pytest.mark.servers
@needs_ffmpeg
def test_black_hole_stalls_ffmpeg_and_ffprobe(tmp_path: Path) -> None:
    with BlackHoleServer() as hole:
        push = _push(hole.url(), 2, tmp_path / "push.log")
        try:
            # ffmpeg without rw_timeout waits for the handshake reply forever.
            with pytest.raises(subprocess.TimeoutExpired):
                push.wait(3)
        finally:
            _stop(push)
        assert hole.connections >= 1
        assert hole.bytes_received >= 1537  # C0+C1 of the RTMP handshake arrived
        start = time.monotonic()
        with pytest.raises(ProbeError):
            probe_streams(hole.url(), timeout=2)
        assert time.monotonic() - start < 5
