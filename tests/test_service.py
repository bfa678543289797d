"""The running service: supervision, prompt switches, HLS and recordings, health and metrics."""

from __future__ import annotations

import itertools
import os
import signal
import time

import pytest

from tests.channel import Channel, frames_output, small_channel
from tests.servers import probe_packets, probe_streams, wait_until

pytestmark = pytest.mark.servers


def _hls(tmp_path):
    return {"kind": "hls", "dir": str(tmp_path / "hls")}


def test_engine_killed_with_sigkill_is_restarted_while_output_keeps_flowing(tmp_path):
    with Channel(tmp_path, small_channel(tmp_path, [_hls(tmp_path)])) as channel:
        wait_until(lambda: channel.health()["engine"]["state"] == "running", 20)
        first_pid = channel.health()["engine"]["pid"]
        os.kill(first_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        samples = []
        while time.monotonic() - killed_at < 6:
            samples.append(frames_output(channel))
            time.sleep(0.25)
        wait_until(lambda: channel.health()["engine"]["state"] == "running", 10)
        engine = channel.health()["engine"]
        metrics = channel.metrics()

    assert all(b > a for a, b in itertools.pairwise(samples)), samples
    assert engine["pid"] != first_pid
    assert engine["restarts"] == 1
    assert metrics['promptcast_engine_restarts_total{reason="crashed"}'] == 1
    assert metrics["promptcast_frames_repeated_total"] > 0


def test_prompt_switch_reaches_the_air_and_its_latency_is_measured(tmp_path):
    with Channel(tmp_path, small_channel(tmp_path, [_hls(tmp_path)])) as channel:
        wait_until(lambda: channel.health()["engine"]["state"] == "running", 20)
        answer = channel.post_prompt("a deep blue ocean under snow")
        wait_until(lambda: channel.metrics().get("promptcast_prompt_switches_total", 0) >= 1, 10)
        state = channel.get("/api/state", token="test-token-0123456789")
        metrics = channel.metrics()

    assert answer["accepted"] is True
    assert b"a deep blue ocean under snow" in state
    assert metrics["promptcast_switch_latency_seconds_count"] == 1
    assert 0 < metrics["promptcast_switch_latency_seconds_sum"] < 5


def test_hls_playlist_is_playable(tmp_path):
    with Channel(tmp_path, small_channel(tmp_path, [_hls(tmp_path)])) as channel:
        playlist = tmp_path / "hls" / "index.m3u8"
        wait_until(lambda: playlist.exists() and playlist.read_text().count(".ts") >= 2, 20,
                   message=channel.logs())
        streams = {s["codec_type"]: s for s in probe_streams(playlist)["streams"]}
        served = channel.get("/hls/index.m3u8")
    assert streams["video"]["codec_name"] == "h264"
    assert streams["audio"]["codec_name"] == "aac"
    assert served.startswith(b"#EXTM3U")


def test_recording_is_valid_after_sigterm(tmp_path):
    rec = tmp_path / "rec"
    config = small_channel(tmp_path, [{"kind": "record", "dir": str(rec)}])
    with Channel(tmp_path, config) as channel:
        time.sleep(5)
        code = channel.stop()
    files = sorted(rec.glob("*.mp4"))
    assert code == 0
    assert len(files) == 1
    packets = probe_packets(files[0], seconds=60)
    video = [p for p in packets if p["codec_type"] == "video"]
    assert len(video) >= 3 * 16
    assert {s["codec_type"] for s in probe_streams(files[0])["streams"]} == {"video", "audio"}


def test_recording_rotates_into_valid_files(tmp_path):
    rec = tmp_path / "rec"
    config = small_channel(tmp_path, [{"kind": "record", "dir": str(rec), "segment_minutes": 0.05,
                                       "format": "mkv"}])
    with Channel(tmp_path, config) as channel:
        wait_until(lambda: len(list(rec.glob("*.mkv"))) >= 3, 30, message=channel.logs())
        channel.stop()
    files = sorted(rec.glob("*.mkv"))
    durations = [float(probe_streams(f)["format"]["duration"]) for f in files]
    # 3 s asked, cut at the next keyframe: whole 2 s GOPs
    assert all(abs(d - 4.0) < 0.2 for d in durations[:-1]), durations
    assert durations[-1] > 0


def test_healthz_reports_every_part(tmp_path):
    with Channel(tmp_path, small_channel(tmp_path, [_hls(tmp_path)])) as channel:
        # "degraded" (engine loading) until the engine's first block; then every part is fine.
        health = wait_until(lambda: (h := channel.health())["status"] == "ok" and h, 30,
                            message=channel.logs())
    assert health["status"] == "ok"
    assert set(health) >= {"pacer", "engine", "outputs", "channel"}
    assert health["engine"]["backend"] == "preview"
    assert "hls-0" in health["outputs"]


def test_control_api_refuses_requests_without_the_token(tmp_path):
    with Channel(tmp_path, small_channel(tmp_path, [_hls(tmp_path)])) as channel:
        body = channel.get("/api/state")
    assert b"bearer token" in body


def test_hung_engine_is_killed_and_restarted(tmp_path):
    config = small_channel(tmp_path, [_hls(tmp_path)], engine={"heartbeat_timeout_s": 2})
    with Channel(tmp_path, config) as channel:
        wait_until(lambda: channel.health()["engine"]["state"] == "running", 20)
        first_pid = channel.health()["engine"]["pid"]
        os.kill(first_pid, signal.SIGSTOP)  # alive but silent: only the heartbeat can tell
        wait_until(lambda: channel.health()["engine"]["restarts"] == 1, 15, message=channel.logs())
        wait_until(lambda: channel.health()["engine"]["state"] == "running", 15)
        metrics = channel.metrics()
        frames_before = frames_output(channel)
        time.sleep(1)
        frames_after = frames_output(channel)
    assert metrics['promptcast_engine_restarts_total{reason="hung"}'] == 1
    assert frames_after > frames_before
    assert "no heartbeat" in channel.logs()
