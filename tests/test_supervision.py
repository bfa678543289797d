"""Engine supervision under repeated kills: the stream never stops, restarts back off, crash loops show."""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import threading
import time

import pytest

from broadcaster import supervisor as supervision
from broadcaster.supervisor import CRASH_LOOP_RESTARTS, CRASH_LOOP_WINDOW_S, CrashLoop
from engine.settings import EngineSettings
from tests.channel import Channel, small_channel
from tests.servers import probe_packets, wait_until
from tests.supervised import metric_values, run_supervised, supervised_preview, until

KILLS = 4
PROBE_SECONDS = 30  # media time ffprobe reads: the kill sequence (~10 s here) fits well inside


def test_three_restarts_within_the_window_are_a_crash_loop_until_a_stable_run():
    loop = CrashLoop()
    assert (CRASH_LOOP_RESTARTS, CRASH_LOOP_WINDOW_S) == (3, 300.0)
    assert [loop.restarted(t) for t in (0.0, 10.0, 20.0, 30.0)] == [False, False, True, False]  # once
    assert loop.active and loop.recent(30.0) == 4
    assert loop.stable() is True  # the log line "crash loop over" is due
    assert not loop.active and loop.recent(30.0) == 0
    assert loop.stable() is False


def test_restarts_spread_wider_than_the_window_are_not_a_crash_loop():
    loop = CrashLoop()
    assert not any(loop.restarted(t) for t in (0.0, 200.0, 400.0, 600.0))  # never 3 within 300 s
    assert not loop.active and loop.recent(600.0) == 2


def test_a_supervised_crash_loop_is_reported_and_ends_once_an_engine_runs_stably(monkeypatch, caplog):
    monkeypatch.setattr(supervision, "STABLE_SECONDS", 2.0)  # a minute in production
    caplog.set_level(logging.INFO, logger="broadcaster.supervisor")
    settings = EngineSettings(backend="preview", width=64, height=48, max_restart_backoff_s=1)
    with supervised_preview(settings) as (supervisor, metrics):

        async def scenario() -> list[dict]:
            statuses = []
            for _ in range(CRASH_LOOP_RESTARTS):
                await until(lambda: supervisor.state == "running" and supervisor.process.is_alive())
                supervisor.process.kill()
                await until(lambda: supervisor.state in ("restarting", "crash-loop"))
                statuses.append(supervisor.status())
            await until(lambda: supervisor.state == "running")
            statuses.append(supervisor.status())
            await until(lambda: not supervisor.crash_loop.active, timeout=10)
            statuses.append(supervisor.status())
            return statuses

        first, second, third, running, stable = run_supervised(supervisor, scenario)
    assert [s["state"] for s in (first, second, third)] == ["restarting", "restarting", "crash-loop"]
    assert [s["crash_loop"] for s in (first, second, third)] == [False, False, True]
    assert third["restarts_recent"] == 3 and 0 < third["next_restart_in_s"] <= 1
    assert running["crash_loop"] is True and running["next_restart_in_s"] is None
    assert stable["crash_loop"] is False and stable["restarts_recent"] == 0 and stable["restarts"] == 3
    assert metric_values(metrics)["promptcast_engine_crash_loop"] == 0
    assert "crash loop over" in caplog.text
    assert [r.levelname for r in caplog.records if "engine crash loop" in r.getMessage()] == ["ERROR"]




@pytest.mark.servers
def test_repeated_sigkills_never_stop_the_rtmp_stream_and_the_restarts_back_off_into_a_crash_loop(
        tmp_path, nginx_rtmp):
    url = nginx_rtmp.url("main")
    config = small_channel(tmp_path, [{"kind": "rtmp", "url": url}], engine={"max_restart_backoff_s": 4})
    probe: dict = {}

    def read_stream() -> None:
        probe["started"] = time.monotonic()
        try:
            probe["packets"] = probe_packets(url, seconds=PROBE_SECONDS)
        except Exception as exc:  # reported by the assertions below
            probe["error"] = exc
        probe["ended"] = time.monotonic()

    with Channel(tmp_path, config) as channel:
        wait_until(lambda: nginx_rtmp.is_publishing("main"), 20, message=channel.logs())
        engine = wait_until(lambda: _running(channel), 20, message=channel.logs())
        reader = threading.Thread(target=read_stream)
        reader.start()
        time.sleep(2)  # ffprobe is connected and reading
        downtimes, waiting = [], []  # per kill: seconds until a new engine ran; health while it waited
        first_kill = time.monotonic()
        for _ in range(KILLS):
            killed = engine["pid"]
            os.kill(killed, signal.SIGKILL)
            killed_at = time.monotonic()
            seen = []

            def back(killed=killed, seen=seen):
                health = channel.health()["engine"]
                seen.append(health)
                up = health["state"] == "running" and health["pid"] not in (None, killed)
                return health if up else None

            engine = wait_until(back, 20, interval=0.05, message=channel.logs())
            downtimes.append(time.monotonic() - killed_at)
            waiting.append([h for h in seen if h["next_restart_in_s"] is not None])
        kills_done = time.monotonic()
        metrics = channel.metrics()
        reader.join(PROBE_SECONDS + 30)
        logs = channel.logs()

    assert "error" not in probe, probe.get("error")
    assert probe["started"] < first_kill < kills_done < probe["ended"]  # ffprobe read across every kill
    video = sorted(float(p["dts_time"]) for p in probe["packets"] if p["codec_type"] == "video")
    gaps = [b - a for a, b in itertools.pairwise(video)]
    assert video[-1] - video[0] > PROBE_SECONDS - 3  # video joins at a keyframe (every 2 s), audio at once
    assert max(gaps) < 1.0, max(gaps)  # 16 fps: 0.0625 s apart however the engine fared
    assert metrics.get('promptcast_output_reconnects_total{output="rtmp-0"}', 0) == 0
    # Every kill restarted, counted in /healthz and /metrics.
    assert engine["restarts"] == KILLS
    assert metrics['promptcast_engine_restarts_total{reason="crashed"}'] == KILLS
    # Each restart waited longer than the one before (backoff 0.5 s doubling, jitter 50-100%).
    delays = [float(d) for d in re.findall(r"restart #\d+ in ([\d.]+)s", logs)]
    assert len(delays) == KILLS, logs
    assert delays == sorted(delays) and delays[-1] >= 4 * delays[0], delays
    assert all(down >= delay for down, delay in zip(downtimes, delays, strict=True)), (downtimes, delays)
    # The third restart within 5 minutes is a crash loop: reported while waiting and after, one ERROR line.
    third = waiting[CRASH_LOOP_RESTARTS - 1]
    assert third and all(h["state"] == "crash-loop" and h["crash_loop"] for h in third), third
    assert all(h["state"] == "restarting" and not h["crash_loop"] for h in waiting[0] + waiting[1])
    assert engine["crash_loop"] is True and engine["restarts_recent"] == KILLS
    assert engine["next_restart_in_s"] is None  # running again, still under watch until stable
    assert metrics["promptcast_engine_crash_loop"] == 1
    errors = [line for line in logs.splitlines() if "engine crash loop" in line]
    assert len(errors) == 1 and "ERROR" in errors[0] and "exit code -9" in errors[0], errors


def _running(channel: Channel) -> dict | None:
    engine = channel.health()["engine"]
    return engine if engine["state"] == "running" and engine["pid"] else None
