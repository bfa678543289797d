"""The `longlive2` backend end to end on the CPU at test size, weights in their official layouts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from engine.backends import BackendUnavailable, choose_backend, create_engine
from engine.longlive2.backend import LongLive2Engine
from engine.longlive2.model import PRESETS, build_random, fp8_blocker, fp8_targets, quantize_fp8
from engine.model import CausalWanModel
from engine.settings import EngineSettings
from engine.weights import WeightPaths2, check_weights
from tests.channel import Channel
from tests.servers import probe_streams, wait_until
from tests.tiny_weights2 import HEIGHT2, WIDTH2, write_tiny_weights2

CUT = "The scene transitions. "


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_tiny_weights2(tmp_path_factory.mktemp("ll2") / "weights")


def _settings(paths: WeightPaths2, **kw) -> EngineSettings:
    return EngineSettings(backend="longlive2", width=WIDTH2, height=HEIGHT2, weights_dir=paths.root,
                          device="cpu", sampling_steps=2, **kw)


def test_blocks_are_29_then_32_uint8_frames_at_24_fps(weights):
    engine = create_engine("longlive2", _settings(weights))
    engine.start("a calm lake", seed=0)
    first, second = engine.next_block(), engine.next_block()
    assert first.shape == (29, HEIGHT2, WIDTH2, 3) and second.shape == (32, HEIGHT2, WIDTH2, 3)
    assert first.dtype == np.uint8 and engine.fps == 24.0


def test_both_switch_kinds_and_a_shot_cut(weights):
    runs = {}
    for mode in ("prompt", "recache"):
        engine = LongLive2Engine(_settings(weights, switch_mode=mode))
        engine.start("a red fire in the night", seed=7)
        blocks = [engine.next_block() for _ in range(2)]
        engine.switch_prompt("a deep blue ocean under snow")
        blocks.append(engine.next_block())
        engine.switch_prompt(CUT + "a desert road at noon")
        blocks.append(engine.next_block())
        runs[mode] = (blocks, engine.recaches, engine.shot_cuts)
    prompt_blocks, prompt_recaches, prompt_cuts = runs["prompt"]
    recache_blocks, recaches, cuts = runs["recache"]
    assert all(np.array_equal(a, b) for a, b in zip(prompt_blocks[:2], recache_blocks[:2], strict=True))
    assert not np.array_equal(prompt_blocks[2], recache_blocks[2])  # the recache changed what block 2 attends
    assert (prompt_recaches, prompt_cuts) == (0, 1) and (recaches, cuts) == (1, 1)  # a cut never recaches


def test_a_stream_can_start_from_an_image(weights, tmp_path):
    picture = tmp_path / "opening.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(picture)
    plain = LongLive2Engine(_settings(weights))
    framed = LongLive2Engine(_settings(weights, start_image=picture))
    for engine in (plain, framed):
        engine.start("a calm lake", seed=1)
    assert framed.start_latent.shape == (1, 1, 48, HEIGHT2 // 16, WIDTH2 // 16)
    a, b = plain.next_block(), framed.next_block()
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert torch.equal(framed.generator.slots[0].latents[:, :1], framed.start_latent)


def test_settings_default_to_1280x704_at_24_fps_and_refuse_sizes_off_32(tmp_path):
    s = EngineSettings(backend="longlive2")
    assert (s.width, s.height, s.fps) == (1280, 704, 24.0)
    assert (EngineSettings(backend="longlive2", width=832, height=480).width) == 832
    with pytest.raises(ValidationError, match="multiple of 32"):
        EngineSettings(backend="longlive2", width=848, height=480)
    with pytest.raises(ValidationError, match="start_image"):
        EngineSettings(backend="longlive", start_image=tmp_path / "x.png")
    with pytest.raises(ValidationError, match="is not a file"):
        EngineSettings(backend="longlive2", start_image=tmp_path / "missing.png")
    with pytest.raises(ValidationError, match="switch_mode"):
        EngineSettings(backend="longlive2", switch_mode="sometimes")


def test_fp8_is_refused_off_cuda_with_the_reason(weights):
    assert "needs CUDA" in fp8_blocker("cpu")
    with pytest.raises(BackendUnavailable, match="FP8 needs CUDA"):
        choose_backend(_settings(weights, fp8=True))
    with pytest.raises(RuntimeError, match="FP8 needs CUDA"):
        quantize_fp8(build_random(PRESETS["tiny"], "cpu", torch.bfloat16))


def test_fp8_targets_the_300_block_linears_as_upstream():
    with torch.device("meta"):
        model = CausalWanModel(PRESETS["5b"])
    targets = fp8_targets(model)
    assert len(targets) == 300 and all(t.startswith("blocks.") for t in targets)


def test_explicit_longlive2_without_weights_names_the_download(tmp_path):
    with pytest.raises(BackendUnavailable, match="download-weights --model longlive2"):
        choose_backend(EngineSettings(backend="longlive2", weights_dir=tmp_path / "none"))


def test_check_weights_longlive2_accepts_the_layout_and_names_problems(weights, tmp_path):
    assert check_weights(weights.root, "longlive2") == []
    broken = write_tiny_weights2(tmp_path / "w")
    broken.text_encoder.unlink()
    state = torch.load(broken.vae, weights_only=True)
    del state["decoder.head.2.weight"]
    torch.save(state, broken.vae)
    problems = check_weights(broken.root, "longlive2")
    assert f"{broken.text_encoder}: missing" in problems
    assert any(str(broken.vae) in p and "decoder.head.2.weight" in p for p in problems)


def test_check_weights_cli_with_model_longlive2(weights):
    result = subprocess.run([sys.executable, "-m", "broadcaster", "check-weights", "--model", "longlive2",
                             str(weights.root)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.servers
def test_service_streams_longlive2_from_an_image_with_both_switch_kinds_and_no_restart(tmp_path, weights,
                                                                                      nginx_rtmp):
    """A recache switch, then a shot cut (the reference's kind, no recache); prompt mode: in-process."""
    mode = "recache"
    picture = tmp_path / "opening.png"
    Image.fromarray(np.full((HEIGHT2, WIDTH2, 3), (200, 40, 40), dtype=np.uint8)).save(picture)
    config = {
        "channel": "ll2",
        "engine": {"backend": "longlive2", "width": WIDTH2, "height": HEIGHT2,
                   "weights_dir": str(weights.root), "device": "cpu", "sampling_steps": 2,
                   "switch_mode": mode, "start_image": str(picture), "prompt": "a red fire in the night"},
        "encoder": {"preset": "ultrafast", "video_bitrate_kbps": 300, "threads": 1},
        "outputs": [{"kind": "rtmp", "url": nginx_rtmp.url("ll2")}],
    }
    with Channel(tmp_path, config) as channel:
        wait_until(lambda: channel.health()["engine"]["state"] == "running", 90, message=channel.logs())
        assert channel.health()["engine"]["backend"] == "longlive2"
        wait_until(lambda: nginx_rtmp.is_publishing("ll2"), 30, message=channel.logs())
        streams = {s["codec_type"]: s for s in probe_streams(nginx_rtmp.url("ll2"))["streams"]}
        # Two blocks in the window first, so a recache has frames beside the sink to re-encode.
        wait_until(lambda: channel.metrics().get("promptcast_frames_generated_total", 0) >= 29 + 32, 60,
                   message=channel.logs())
        channel.post_prompt("a deep blue ocean under snow")
        wait_until(lambda: channel.metrics().get("promptcast_prompt_switches_total", 0) >= 1, 60,
                   message=channel.logs())
        channel.post_prompt(CUT + "a desert road at noon")  # a shot cut: never a recache
        wait_until(lambda: channel.metrics().get("promptcast_prompt_switches_total", 0) >= 2, 60,
                   message=channel.logs())
        metrics = channel.metrics()
    assert (streams["video"]["width"], streams["video"]["height"]) == (WIDTH2, HEIGHT2)
    assert metrics["promptcast_recaches_total"] == 1
    assert sum(v for k, v in metrics.items() if k.startswith("promptcast_engine_restarts")) == 0


def test_download_weights_longlive2_plans_its_own_repositories(tmp_path, monkeypatch):
    import huggingface_hub

    from engine.weights import download_weights

    asked = []

    def unreachable(repo_id, **kw):
        asked.append((repo_id, tuple(kw["allow_patterns"])))
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    said = []
    assert download_weights(tmp_path, say=said.append, model="longlive2") == 3
    assert asked == [("Efficient-Large-Model/LongLive-2.0-5B", ("model_bf16.pt",))]
    assert "cannot reach the Hugging Face Hub for Efficient-Large-Model/LongLive-2.0-5B" in said[0]


def test_gpu_check_smoke_runs_on_the_cpu_at_tiny_size(capsys):
    from engine.longlive2.gpu_check import main

    args = ["--device", "cpu", "--size", "tiny", "--blocks", "4", "--width", "64", "--height", "32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "shot cut at 2" in out and "DiT + VAE" in out and "FPS" in out


def test_bench_engine_longlive2_reports_fps_and_refuses_a_1_0_size():
    from engine.longlive2.bench import bench_longlive2

    report = bench_longlive2(size="tiny", blocks=2, device="cpu", width=64, height=32)
    assert "longlive2 size tiny" in report and "29 + 32/block" in report and "FPS" in report
    with pytest.raises(ValueError, match="not a longlive2 preset"):
        bench_longlive2(size="1.3b", device="cpu")
