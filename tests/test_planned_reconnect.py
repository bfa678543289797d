"""Planned RTMP reconnects before an ingest's session cap (Twitch ends a broadcast at 48 h)."""

from __future__ import annotations

import itertools
import re

import pytest

from broadcaster.outputs.factory import mux_target
from broadcaster.settings import ConfigError, RtmpOutputSettings, parse_settings
from tests.channel import Channel, small_channel
from tests.servers import keyframe_times, probe_packets, wait_until

FRAME = 1 / 16


@pytest.mark.servers
def test_planned_reconnect_happens_at_a_keyframe_and_ffprobe_reads_one_continuous_stream(
        tmp_path, nginx_rtmp):
    output = {"kind": "rtmp", "url": nginx_rtmp.url("main"), "planned_reconnect_hours": 5 / 3600}
    with Channel(tmp_path, small_channel(tmp_path, [output])) as channel:
        wait_until(lambda: nginx_rtmp.is_publishing("main"), 20, message=channel.logs())
        packets = probe_packets(nginx_rtmp.url("main"), seconds=13)
        metrics = channel.metrics()
        health = channel.health()

    planned = metrics['promptcast_output_planned_reconnects_total{output="rtmp-0"}']
    assert planned >= 2
    # They were planned, not failures: no failure reconnect, and nginx saw a publish per connection.
    assert metrics['promptcast_output_reconnects_total{output="rtmp-0"}'] == 0
    assert health["outputs"]["rtmp-0"]["planned_reconnects"] == planned
    assert len(re.findall(r"publish: name='main'", nginx_rtmp.logs())) >= 1 + planned
    # The player read straight through the reconnects: one frame every 1/16 s, a keyframe every 2 s.
    video = sorted(float(p["dts_time"]) for p in packets if p["codec_type"] == "video")
    gaps = [b - a for a, b in itertools.pairwise(video)]
    assert video[-1] - video[0] >= 11
    assert all(abs(gap - FRAME) < 0.002 for gap in gaps), [g for g in gaps if abs(g - FRAME) >= 0.002]
    keys = keyframe_times(packets)
    assert all(abs((b - a) - 2.0) < 0.01 for a, b in itertools.pairwise(keys)), keys


def test_planned_reconnect_defaults_to_just_under_twitchs_48_hour_cap():
    output = RtmpOutputSettings(kind="rtmp", url="rtmp://live.example/app/key")

    assert output.planned_reconnect_hours == 47.5
    assert mux_target(output, "live", "demo", 2.0).rotate_seconds == 47.5 * 3600


def test_planned_reconnect_of_zero_never_reconnects():
    output = RtmpOutputSettings(kind="rtmp", url="rtmp://live.example/app/key", planned_reconnect_hours=0)

    assert mux_target(output, "live", "demo", 2.0).rotate_seconds is None


def test_negative_planned_reconnect_is_refused_with_its_location():
    text = "outputs:\n  - kind: rtmp\n    url: rtmp://h/app/k\n    planned_reconnect_hours: -1\n"
    with pytest.raises(ConfigError) as refused:
        parse_settings(text, env={})

    assert "line 4: outputs[0].planned_reconnect_hours" in str(refused.value)
