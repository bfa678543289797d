"""Phased supervision of a real LongLive engine process: loading, warm-up, running, each with its own rule.

The engines are real (tiny weights in the official formats, on the CPU); hangs are real too
(SIGSTOP of the engine process), never simulated inside the engine.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from broadcaster.health import HealthVerdict
from engine.progress import LoadProgress, describe
from engine.settings import EngineSettings
from tests.supervised import run_supervised, supervised_preview, until
from tests.tiny_weights import HEIGHT, WIDTH, write_tiny_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("phases") / "weights")


def _settings(weights, **kw) -> EngineSettings:
    base = {"backend": "longlive", "width": WIDTH, "height": HEIGHT, "device": "cpu",
            "weights_dir": weights.root, "steps": [1000, 500], "max_restart_backoff_s": 1}
    return EngineSettings(**{**base, **kw})


def test_a_start_longer_than_the_heartbeat_timeout_reaches_running_without_a_restart(weights):
    # 1.9 MB of tiny weights read at 0.25 MB/s: a load of about 8 s, four times the heartbeat rule.
    settings = _settings(weights, heartbeat_timeout_s=2, load_max_mb_s=0.25)
    with supervised_preview(settings, "longlive") as (supervisor, _):

        async def scenario():
            spawned = time.monotonic()
            await until(lambda: supervisor.state == "running", timeout=60)
            started = time.monotonic() - spawned
            await until(lambda: supervisor.block >= 6, timeout=60)
            return started, supervisor.status()

        started, status = run_supervised(supervisor, scenario)
    assert started > 3 * settings.heartbeat_timeout_s  # the point: loading outlasts the heartbeat rule
    assert status["restarts"] == 0 and status["state"] == "running" and status["phase"] == "running"
    progress = status["load_progress"]
    assert progress["files_done"] == progress["files"] == 4 and progress["bytes"] == progress["total"] > 0


def test_a_load_that_stops_progressing_is_restarted_after_startup_timeout_s(weights):
    # Long enough for a healthy start on a busy machine (the import of torch alone reports nothing
    # for a second or more), short enough for a quick test.
    settings = _settings(weights, startup_timeout_s=8)
    with supervised_preview(settings, "longlive") as (supervisor, _):

        async def scenario():
            await until(lambda: supervisor.process is not None and supervisor.process.pid)
            first = supervisor.process
            os.kill(first.pid, signal.SIGSTOP)  # a disk that stops answering mid-load
            stopped = time.monotonic()
            await until(lambda: supervisor.restarts == 1, timeout=30)
            caught = time.monotonic() - stopped
            error = supervisor.last_error
            await until(lambda: supervisor.state == "running", timeout=60)  # the next engine loads fine
            return caught, error

        caught, error = run_supervised(supervisor, scenario)
    assert error.startswith("load stalled: no progress for")
    assert settings.startup_timeout_s <= caught < settings.startup_timeout_s + 10


def test_a_hang_in_warm_up_is_caught_by_the_warmup_timeout(weights):
    # 256x256 makes the first block take seconds on a CPU, so the stop lands inside the warm-up.
    settings = _settings(weights, width=256, height=256, steps=[1000, 750, 500, 250], warmup_timeout_s=3)
    with supervised_preview(settings, "longlive") as (supervisor, _):

        async def scenario():
            await until(lambda: supervisor.state == "warmup", timeout=60)
            os.kill(supervisor.process.pid, signal.SIGSTOP)
            await until(lambda: supervisor.restarts == 1, timeout=30)
            return supervisor.last_error, supervisor.block

        error, block = run_supervised(supervisor, scenario)
    assert error.startswith("warmup not done after") and "warmup_timeout_s 3" in error
    assert block == 0


def test_a_hang_after_the_first_block_is_caught_by_the_heartbeat(weights):
    settings = _settings(weights, heartbeat_timeout_s=2)
    with supervised_preview(settings, "longlive") as (supervisor, _):

        async def scenario():
            await until(lambda: supervisor.state == "running" and supervisor.block >= 1, timeout=60)
            os.kill(supervisor.process.pid, signal.SIGSTOP)
            await until(lambda: supervisor.restarts == 1, timeout=30)
            return supervisor.last_error

        error = run_supervised(supervisor, scenario)
    assert error.startswith("no heartbeat for")


def test_compile_gets_a_longer_warm_up_by_default():
    assert EngineSettings().effective_warmup_timeout_s == 300
    assert EngineSettings(compile=True).effective_warmup_timeout_s == 1200
    assert EngineSettings(compile=True, warmup_timeout_s=60).effective_warmup_timeout_s == 60


def test_load_progress_counts_bytes_per_file_and_says_it_in_gigabytes(tmp_path):
    big, small = tmp_path / "dit.pt", tmp_path / "vae.pth"
    big.write_bytes(b"\0" * 3_000_000)
    small.write_bytes(b"\0" * 1_000_000)
    reports = []
    progress = LoadProgress([big, small], reports.append, interval_s=0)
    progress.advance(big, 1_500_000)
    progress.advance(big, 9_000_000)  # a file's tensors never count past its size
    progress.finish(small)
    assert [r["bytes"] for r in reports] == [1_500_000, 3_000_000, 4_000_000]
    assert reports[-1] == {"file": "vae.pth", "file_bytes": 1_000_000, "file_total": 1_000_000,
                                "bytes": 4_000_000, "total": 4_000_000, "files_done": 2, "files": 2}
    assert describe(reports[0]) == "loading weights 0.0 / 0.0 GB (dit.pt)"
    shown = describe({"bytes": 7.2e9, "total": 14.1e9, "file": "t5.pth"})
    assert shown == "loading weights 7.2 / 14.1 GB (t5.pth)"
    assert describe(None) == "loading weights"


def test_healthz_is_degraded_with_the_phase_until_the_engine_runs():
    verdict = HealthVerdict()
    loading = {"engine": {"state": "loading", "phase": "loading weights 7.2 / 14.1 GB (t5.pth)"}}
    assert verdict.reasons(loading) == ["engine loading: loading weights 7.2 / 14.1 GB (t5.pth)"]
    assert verdict.reasons({"engine": {"state": "compiling", "phase": "compiling the DiT (40s)"}}) == [
        "engine compiling: compiling the DiT (40s)"]
    assert verdict.reasons({"engine": {"state": "running", "phase": "running"}}) == []
