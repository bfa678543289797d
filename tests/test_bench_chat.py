"""`promptcast bench chat` runs end to end on both stores and refuses to report an inexact tally."""

from __future__ import annotations

import re

import pytest

from broadcaster import bench_chat
from tests.redis_server import RedisServer, redis_available


def test_bench_chat_on_memory_reports_votes_latency_and_an_exact_tally() -> None:
    out = bench_chat.bench_chat(viewers=300, paced_rate=2000)
    assert re.search(r"votes: [\d,]+ votes/s; events: [\d,]+ events/s", out)
    assert re.search(r"latency p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert "exact: tally" in out and "15 of 15 suggestions in the pool" in out


@pytest.mark.servers
@pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")
def test_bench_chat_on_redis_also_measures_the_pipelined_ceiling(tmp_path) -> None:
    with RedisServer(tmp_path) as redis:
        out = bench_chat.bench_chat(redis.url, viewers=300, paced_rate=2000, ceiling_commands=5000)
    assert re.search(r"redis pipelined ceiling .*: [\d,]+ commands/s; votes/s is [\d.]+% of it", out)


def test_an_inexact_tally_is_an_error_not_a_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    real = bench_chat._stream

    def one_vote_lost(viewers, rng):  # the expectation counts a vote the stream never sends
        stream = real(viewers, rng)
        stream.last[10**7] = 1
        return stream

    monkeypatch.setattr(bench_chat, "_stream", one_vote_lost)
    with pytest.raises(RuntimeError, match="not exact"):
        bench_chat.bench_chat(viewers=200, paced_rate=2000)
