"""Each steering mode end to end: chat through the local source to the preview engine."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from tests.channel import Channel, small_channel
from tests.servers import wait_until

pytestmark = pytest.mark.servers


def _post(channel: Channel, path: str, body: dict) -> dict:
    request = urllib.request.Request(channel.url(path), data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": "Bearer test-token-0123456789",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _say(channel: Channel, login: str, text: str, role: str = "viewer") -> None:
    _post(channel, f"/api/chat?login={login}&role={role}", {"text": text})


def _state(channel: Channel) -> dict:
    return json.loads(channel.get("/api/state", token="test-token-0123456789"))


def _on_air(channel: Channel) -> str:
    return _state(channel)["prompt_on_air"]


def _applied_at_block_boundary(channel: Channel) -> bool:
    """The engine applied switch #1 before a block (its log line names the block)."""
    return re.search(r"prompt switch #1 applied at block \d+", channel.logs()) is not None


def _channel(tmp_path, mode: str, **chat) -> Channel:
    config = small_channel(tmp_path, [{"kind": "hls", "dir": str(tmp_path / "hls")}],
                           chat={"mode": mode, **chat})
    return Channel(tmp_path, config)


def test_vote_mode_plays_the_winner_of_a_round(tmp_path):
    vote = {"round_seconds": 3, "min_suggestions": 2, "options": 2}
    with _channel(tmp_path, "vote", vote=vote) as channel:
        _say(channel, "alice", "!prompt a red fox in the snow")
        _say(channel, "bob", "!prompt a blue whale in the deep sea")
        wait_until(lambda: (_state(channel)["steering"]["round"] or {}).get("options"), 10,
                   message=channel.logs())
        for voter in ("carol", "dave", "erin"):
            _say(channel, voter, "!vote 2")
        _say(channel, "carol", "!vote 1")  # changes her vote: last vote counts
        wait_until(lambda: _on_air(channel) == "a blue whale in the deep sea", 20, message=channel.logs())
        metrics = channel.metrics()
    assert metrics["promptcast_votes_total"] == 4
    assert metrics["promptcast_prompt_switches_total"] == 1
    assert _applied_at_block_boundary(channel)


def test_queue_mode_plays_accepted_prompts_in_turn(tmp_path):
    queue = {"min_play_seconds": 0, "user_cooldown_seconds": 0}
    with _channel(tmp_path, "queue", queue=queue) as channel:
        _say(channel, "alice", "!prompt a neon city at night")
        wait_until(lambda: _on_air(channel) == "a neon city at night", 15, message=channel.logs())
        _say(channel, "bob", "!p a quiet forest at dawn")
        wait_until(lambda: _on_air(channel) == "a quiet forest at dawn", 15, message=channel.logs())
        metrics = channel.metrics()
    assert metrics["promptcast_prompt_switches_total"] == 2
    assert metrics["promptcast_queue_depth"] == 0
    assert _applied_at_block_boundary(channel)


def test_manual_mode_plays_a_suggestion_only_once_approved(tmp_path):
    with _channel(tmp_path, "manual") as channel:
        _say(channel, "alice", "!prompt a golden desert with dunes")
        wait_until(lambda: _state(channel)["steering"]["pool"], 10, message=channel.logs())
        [suggestion] = _state(channel)["steering"]["pool"]
        assert _on_air(channel) != "a golden desert with dunes"
        _post(channel, "/api/approve", {"id": suggestion["id"]})
        wait_until(lambda: _on_air(channel) == "a golden desert with dunes", 15, message=channel.logs())
    assert _applied_at_block_boundary(channel)


def test_refused_suggestions_are_counted_by_reason(tmp_path):
    with _channel(tmp_path, "queue", moderation={"blocklist": ["forbidden"]}) as channel:
        _say(channel, "alice", "!prompt x")
        _say(channel, "bob", "!prompt a f\u200borbidden place")
        _say(channel, "carol", "!vote banana")
        wait_until(lambda: sum(v for k, v in channel.metrics().items()
                               if k.startswith("promptcast_prompts_rejected_total")) >= 3, 10)
        metrics = channel.metrics()
    assert metrics['promptcast_prompts_rejected_total{reason="too_short"}'] == 1
    assert metrics['promptcast_prompts_rejected_total{reason="blocked"}'] == 1
    assert metrics['promptcast_prompts_rejected_total{reason="bad_syntax"}'] == 1
    assert metrics['promptcast_chat_messages_total{source="local"}'] == 3


def test_panel_prompt_is_played_at_the_next_block(tmp_path):
    with _channel(tmp_path, "vote") as channel:
        answer = channel.post_prompt("a storm over the ocean")
        wait_until(lambda: _on_air(channel) == "a storm over the ocean", 15, message=channel.logs())
    assert answer["accepted"] is True
