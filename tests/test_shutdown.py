"""SIGTERM: stop taking chat, finish the current GOP, close recordings, acknowledge nothing unapplied."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.channel import Channel, small_channel
from tests.redis_server import RedisServer, redis_available
from tests.servers import keyframe_times, probe_packets, wait_until

GOP = 32  # 2 s keyframe interval at 16 fps


def test_sigterm_ends_the_recording_on_a_complete_gop(tmp_path):
    rec = tmp_path / "rec"
    config = small_channel(tmp_path, [{"kind": "record", "dir": str(rec), "format": "mkv"}])
    with Channel(tmp_path, config) as ch:
        wait_until(lambda: ch.metrics().get("promptcast_frames_output_total", 0) > 16 * 5, 30)
        code = ch.stop()

    [recording] = rec.glob("*.mkv")
    video = [p for p in probe_packets(recording, seconds=600) if p["codec_type"] == "video"]
    keys = keyframe_times(video)
    assert code == 0
    assert len(video) % GOP == 0, f"{len(video)} frames: the last GOP was cut short"
    assert len(keys) == len(video) // GOP
    assert "finishing the current GOP" in ch.logs()


def _queue_texts(channel: Channel) -> list[str]:
    state = json.loads(channel.get("/api/state", token="test-token-0123456789"))
    return [q["text"] for q in state["steering"]["queue"]]


def _chat(channel: Channel, text: str, login: str) -> None:
    request = urllib.request.Request(channel.url(f"/api/chat?login={login}"), method="POST",
                                     data=json.dumps({"text": text}).encode(),
                                     headers={"Authorization": "Bearer test-token-0123456789",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 202


@pytest.mark.skipif(not redis_available(), reason="redis-server not installed")
def test_prompts_accepted_but_not_yet_on_air_survive_sigterm_unacknowledged(tmp_path):
    with RedisServer(tmp_path) as redis:
        config = small_channel(tmp_path, [], store={"kind": "redis", "url": redis.url},
                               chat={"mode": "queue", "queue": {"min_play_seconds": 600}})
        with Channel(tmp_path, config) as channel:
            _chat(channel, "!prompt a lighthouse in a storm", "ana")
            _chat(channel, "!prompt a quiet library at night", "bob")
            wait_until(lambda: len(_queue_texts(channel)) == 2, 10, message=channel.logs())
            assert channel.stop() == 0

        with Channel(tmp_path, config) as again:
            queued = _queue_texts(again)

    assert queued == ["a lighthouse in a storm", "a quiet library at night"]
