"""The `longlive` backend end to end on the CPU at test size, weights in their official formats."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from engine import backends
from engine.backends import BackendUnavailable, choose_backend
from engine.longlive import LongLiveEngine
from engine.settings import EngineSettings
from engine.weights import WeightPaths, check_weights
from tests.channel import Channel
from tests.servers import free_port, probe_streams, wait_until
from tests.tiny_weights import HEIGHT, WIDTH, write_full_arch_weights, write_tiny_weights


@pytest.fixture
def weights(tmp_path):
    return write_tiny_weights(tmp_path / "weights")


def _settings(paths: WeightPaths, **kw) -> EngineSettings:
    return EngineSettings(backend="longlive", width=WIDTH, height=HEIGHT, weights_dir=paths.root,
                          device="cpu", steps=[1000, 500], **kw)


def test_prompt_switch_takes_effect_at_the_next_block_with_one_recache(weights):
    steady, switched = LongLiveEngine(_settings(weights)), LongLiveEngine(_settings(weights))
    for engine in (steady, switched):
        engine.start("a red fire in the night", seed=7)
    same = [(steady.next_block(), switched.next_block()) for _ in range(2)]
    switched.switch_prompt("a deep blue ocean under snow")
    after = (steady.next_block(), switched.next_block())
    assert all(np.array_equal(a, b) for a, b in same)
    assert not np.array_equal(*after)
    assert switched.recaches == 1 and steady.recaches == 0


def test_blocks_are_uint8_rgb_at_the_engine_size_nine_then_twelve_frames(weights):
    engine = LongLiveEngine(_settings(weights))
    engine.start("a calm lake", seed=0)
    first, second = engine.next_block(), engine.next_block()
    assert first.shape == (9, HEIGHT, WIDTH, 3) and second.shape == (12, HEIGHT, WIDTH, 3)
    assert first.dtype == np.uint8


def test_a_prepared_prompt_switches_without_running_the_text_encoder(weights):
    engine = LongLiveEngine(_settings(weights))
    engine.start("a calm lake", seed=0)
    engine.prepare_prompt("a storm at sea")
    calls = engine.text.model_calls
    engine.switch_prompt("a storm at sea")
    engine.next_block()
    assert engine.text.model_calls == calls


def test_reset_then_start_repeats_the_stream(weights):
    engine = LongLiveEngine(_settings(weights))
    engine.start("a calm lake", seed=3)
    first = engine.next_block()
    engine.reset()
    engine.start("a calm lake", seed=3)
    assert np.array_equal(engine.next_block(), first)


def test_auto_without_cuda_runs_preview_and_says_why(weights, monkeypatch):
    monkeypatch.setattr(backends, "_cuda", lambda: None)
    name, reason = choose_backend(EngineSettings(weights_dir=weights.root, width=WIDTH, height=HEIGHT))
    assert name == "preview" and "no CUDA" in reason


def test_auto_without_weights_runs_preview_and_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "_cuda", lambda: "NVIDIA H100")
    name, reason = choose_backend(EngineSettings(weights_dir=tmp_path / "none"))
    assert name == "preview" and "download-weights" in reason


def test_auto_with_cuda_and_weights_runs_longlive(weights, monkeypatch):
    monkeypatch.setattr(backends, "_cuda", lambda: "NVIDIA H100")
    name, reason = choose_backend(EngineSettings(weights_dir=weights.root, width=WIDTH, height=HEIGHT))
    assert name == "longlive" and "H100" in reason


def test_explicit_longlive_without_weights_is_refused_with_the_fix(tmp_path):
    with pytest.raises(BackendUnavailable, match="download-weights"):
        choose_backend(EngineSettings(backend="longlive", weights_dir=tmp_path / "none"))


def test_longlive_refuses_a_size_that_is_not_a_multiple_of_16(weights):
    with pytest.raises(BackendUnavailable, match="multiple of 16"):
        choose_backend(EngineSettings(backend="longlive", weights_dir=weights.root, width=100, height=64))


def test_check_weights_accepts_a_complete_directory(weights):
    assert check_weights(weights.root) == []


def test_check_weights_names_a_missing_file(weights):
    weights.vae.unlink()
    problems = check_weights(weights.root)
    assert problems == [f"{weights.vae}: missing"]


def test_check_weights_names_wrong_keys(weights):
    state = torch.load(weights.vae, weights_only=True)
    del state["decoder.head.2.weight"]
    torch.save(state, weights.vae)
    [problem] = check_weights(weights.root)
    assert str(weights.vae) in problem and "decoder.head.2.weight" in problem and "missing" in problem


def test_check_weights_cli_exits_2_and_lists_problems(weights):
    weights.lora.write_bytes(b"not a checkpoint")
    result = subprocess.run([sys.executable, "-m", "broadcaster", "check-weights", str(weights.root)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "lora.pt" in result.stderr


def test_download_weights_fails_fast_when_the_hub_is_unreachable(tmp_path):
    closed = free_port()  # nothing listens here
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "broadcaster", "download-weights", "--dir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "HF_ENDPOINT": f"http://127.0.0.1:{closed}", "HF_HUB_OFFLINE": "0"})
    assert result.returncode == 3
    assert "cannot reach the Hugging Face Hub" in result.stdout
    assert time.monotonic() - started < 30


@pytest.mark.servers
def test_service_streams_longlive_to_rtmp_and_a_switch_recaches(tmp_path, weights, nginx_rtmp):
    config = {
        "channel": "ll",
        "engine": {"backend": "longlive", "width": WIDTH, "height": HEIGHT, "weights_dir": str(weights.root),
                   "device": "cpu", "steps": [1000, 500], "prompt": "a red fire in the night"},
        "encoder": {"preset": "ultrafast", "video_bitrate_kbps": 300, "threads": 1},
        "outputs": [{"kind": "rtmp", "url": nginx_rtmp.url("ll")}],
    }
    with Channel(tmp_path, config) as channel:
        wait_until(lambda: channel.health()["engine"]["state"] == "running", 60, message=channel.logs())
        assert channel.health()["engine"]["backend"] == "longlive"
        wait_until(lambda: nginx_rtmp.is_publishing("ll"), 30, message=channel.logs())
        streams = {s["codec_type"]: s for s in probe_streams(nginx_rtmp.url("ll"))["streams"]}
        channel.post_prompt("a deep blue ocean under snow")
        wait_until(lambda: channel.metrics().get("promptcast_prompt_switches_total", 0) >= 1, 30,
                   message=channel.logs())
        metrics = channel.metrics()
    assert (streams["video"]["width"], streams["video"]["height"]) == (WIDTH, HEIGHT)
    assert metrics["promptcast_recaches_total"] == 1
    assert metrics["promptcast_switch_latency_seconds_count"] == 1


@pytest.mark.servers
@pytest.mark.timeout(1200)  # about 3 minutes on a quiet 2-core machine (docs/testing.md)
def test_the_1_3b_architecture_in_bf16_streams_and_switches_with_default_timeouts(tmp_path, nginx_rtmp):
    # What a GPU host runs (bf16, the full 30 x 1536 DiT, a multi-GB load), rehearsed on the CPU at
    # 64x64 with one denoising step: each DiT pass takes seconds here, far past nothing but the
    # default heartbeat if the engine only beat per block.
    weights = write_full_arch_weights(tmp_path / "weights")
    config = {
        "channel": "full",
        "engine": {"backend": "longlive", "width": 64, "height": 64, "weights_dir": str(weights.root),
                   "device": "cpu", "dtype": "bf16", "steps": [1000], "prompt": "a red fire in the night"},
        "encoder": {"preset": "ultrafast", "video_bitrate_kbps": 200, "threads": 1},
        "outputs": [{"kind": "rtmp", "url": nginx_rtmp.url("full")}],
    }
    with Channel(tmp_path, config) as channel:
        wait_until(lambda: channel.health()["engine"]["block"] >= 1, 600, message=channel.logs())
        wait_until(lambda: nginx_rtmp.is_publishing("full"), 60, message=channel.logs())
        channel.post_prompt("a deep blue ocean under snow")
        wait_until(lambda: channel.metrics().get("promptcast_prompt_switches_total", 0) >= 1, 600,
                   message=channel.logs())
        health, metrics = channel.health(), channel.metrics()
    assert health["engine"]["restarts"] == 0, channel.logs()
    assert health["engine"]["load_progress"]["bytes"] > 2.8e9
    assert metrics["promptcast_recaches_total"] == 1
