"""Two channels on one real Redis, as config/multi-channel/ runs them: each is its own `promptcast run`
process under its own key prefix. Votes and queues never cross; one channel's crash leaves the other
streaming with its state intact, and the crashed one comes back with everything it had accepted."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.channel import Channel, frames_output, small_channel
from tests.redis_server import RedisServer, redis_available
from tests.servers import wait_until

pytestmark = [pytest.mark.servers,
              pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")]

A_TEXTS = ("a red fox in the snow", "a blue whale in the sea", "a quiet harbour at dawn")
B_TEXTS = ("a desert caravan at noon", "a neon city in the rain", "a mountain lake at dusk")


def _config(tmp_path: Path, channel: str, redis_url: str, chat: dict[str, Any]) -> dict[str, Any]:
    config = small_channel(tmp_path, [{"kind": "hls", "dir": str(tmp_path / "hls")}],
                           store={"kind": "redis", "url": redis_url}, chat=chat)
    config["channel"] = channel
    return config


VOTE = {"mode": "vote", "vote": {"round_seconds": 120, "options": 2, "min_suggestions": 2}}
# Accepted prompts stay queued for the whole test: none may play before 10 minutes.
QUEUE = {"mode": "queue", "queue": {"min_play_seconds": 600}}


def _post(channel: Channel, path: str, body: dict | None = None) -> None:
    request = urllib.request.Request(channel.url(path), data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Authorization": "Bearer test-token-0123456789",
                                              "Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).read()


def _say(channel: Channel, login: str, text: str) -> None:
    _post(channel, f"/api/chat?login={login}", {"text": text})


def _state(channel: Channel) -> dict:
    return json.loads(channel.get("/api/state", token="test-token-0123456789"))["steering"]


def _tally(channel: Channel) -> list[int]:
    return [o["votes"] for o in (_state(channel)["round"] or {}).get("options", [])]


def _queue(channel: Channel) -> list[str]:
    return [q["text"] for q in _state(channel)["queue"]]


def _snapshot(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under `prefix` with its type and full content."""
    content: dict[str, Any] = {}
    for key in sorted(client.scan_iter(match=f"{prefix}*", count=1000)):
        kind = client.type(key)
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(client.smembers(key))
        elif kind == "stream":
            value = [client.xrange(key), [(g["name"], g["pending"]) for g in client.xinfo_groups(key)]]
        else:
            value = None
        content[key] = (kind, value)
    return content


def _vote_round(channel: Channel, texts: tuple[str, ...], votes: dict[str, int]) -> None:
    """Pause the channel (its queue holds), open a round of two suggestions, cast `votes`, queue texts[2]."""
    _post(channel, "/api/pause")
    _say(channel, "alice", f"!prompt {texts[0]}")
    _say(channel, "bob", f"!prompt {texts[1]}")
    wait_until(lambda: _tally(channel), 15, message=channel.logs())
    for login, option in votes.items():
        _say(channel, login, f"!vote {option}")
    _post(channel, "/api/prompt", {"prompt": texts[2]})


def _gone(pid: int) -> bool:
    """The process has exited (a zombie left for an init that does not reap counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "\nState:\tZ" in status


def test_votes_and_queues_of_two_channels_on_one_redis_never_mix(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with RedisServer(tmp_path) as server:
        a = Channel(tmp_path / "a", _config(tmp_path / "a", "alpha", server.url, VOTE))
        b = Channel(tmp_path / "b", _config(tmp_path / "b", "beta", server.url, VOTE))
        try:  # not `with Channel(...)`: a channel whose start fails must still be stopped
            a.start()
            b.start()
            # erin votes in both channels, differently: one vote per user *per channel*.
            _vote_round(a, A_TEXTS, {"carol": 1, "dave": 1, "erin": 1})
            _vote_round(b, B_TEXTS, {"erin": 2, "frank": 2})
            wait_until(lambda: _tally(a) == [3, 0] and _queue(a) == [A_TEXTS[2]], 15, message=a.logs())
            wait_until(lambda: _tally(b) == [0, 2] and _queue(b) == [B_TEXTS[2]], 15, message=b.logs())
            state_a, state_b = _state(a), _state(b)

            client = redis.Redis.from_url(server.url, decode_responses=True)
            keys = set(client.scan_iter(count=1000))
            alpha, beta = _snapshot(client, "promptcast:alpha:"), _snapshot(client, "promptcast:beta:")
            client.close()
        finally:
            b.stop()
            a.stop()

    assert [o["text"] for o in state_a["round"]["options"]] == list(A_TEXTS[:2])
    assert [o["text"] for o in state_b["round"]["options"]] == list(B_TEXTS[:2])
    assert state_a["pool"] == [] and state_b["pool"] == []
    for text in A_TEXTS:
        assert text not in json.dumps(state_b) and text not in json.dumps(beta)
    for text in B_TEXTS:
        assert text not in json.dumps(state_a) and text not in json.dumps(alpha)
    # Every key is under one of the two prefixes, and both channels use the same layout.
    assert keys == set(alpha) | set(beta)
    assert alpha and beta
    assert {k.removeprefix("promptcast:alpha:") for k in alpha if ":seen:" not in k} == \
           {k.removeprefix("promptcast:beta:") for k in beta if ":seen:" not in k}
    assert alpha["promptcast:alpha:round:votes"] == ("hash", {"local:carol": "1", "local:dave": "1",
                                                                 "local:erin": "1"})
    assert beta["promptcast:beta:round:votes"] == ("hash", {"local:erin": "2", "local:frank": "2"})


def test_one_channel_crashing_leaves_the_other_streaming_and_comes_back_with_its_queue(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a-again").mkdir()
    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        a = Channel(tmp_path / "a", _config(tmp_path / "a", "alpha", server.url, QUEUE))
        b = Channel(tmp_path / "b", _config(tmp_path / "b", "beta", server.url, VOTE))
        again = None
        try:
            a.start()
            b.start()
            for login, text in zip(("alice", "bob", "carol"), A_TEXTS, strict=True):
                _say(a, login, f"!prompt {text}")
            _vote_round(b, B_TEXTS, {"erin": 2, "frank": 2})
            wait_until(lambda: _queue(a) == list(A_TEXTS), 15, message=a.logs())
            wait_until(lambda: _tally(b) == [0, 2] and _queue(b) == [B_TEXTS[2]], 15, message=b.logs())
            state_b = _state(b)
            beta = _snapshot(client, "promptcast:beta:")
            health_a = a.health()
            children = [health_a["engine"]["pid"], *(o["pid"] for o in health_a["outputs"].values())]
            assert all(children), health_a

            a.process.kill()  # SIGKILL to the main process: a crash, no shutdown at all
            a.process.wait(10)
            a.stop()
            killed_at = frames_output(b)

            # B streams on: its clock keeps sending frames (16 a second) and it reports healthy.
            wait_until(lambda: frames_output(b) >= killed_at + 32, 15, message=b.logs())
            assert b.health()["status"] == "ok"
            # A's engine and muxer see their pipes close and exit by themselves.
            wait_until(lambda: all(_gone(pid) for pid in children), 15,
                       message=f"children of the killed channel still running: {children}")
            # Nothing of B's moved; A's accepted prompts wait in Redis.
            assert _snapshot(client, "promptcast:beta:") == beta
            assert {k: _state(b)[k] for k in ("round", "queue", "pool")} == \
                   {k: state_b[k] for k in ("round", "queue", "pool")}
            assert client.xlen("promptcast:alpha:queue") == len(A_TEXTS)

            # The same config again (same port, same Redis): everything A had accepted is still queued.
            again = Channel(tmp_path / "a-again", a.config)
            again.port = a.port  # the config names the port; Channel would otherwise poll a fresh one
            again.start()
            assert _queue(again) == list(A_TEXTS)
            assert [q["chosen_by"] for q in _state(again)["queue"]] == ["@alice", "@bob", "@carol"]
            before = frames_output(b)
            wait_until(lambda: frames_output(b) >= before + 16, 10, message=b.logs())
            assert _snapshot(client, "promptcast:beta:") == beta
        finally:
            for channel in (again, b, a):
                if channel is not None:
                    channel.stop()
            client.close()
