"""The LongLive engine core against the reference: golden vectors, cache semantics, recache, sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.attention import attention_backend
from engine.cache import CrossCache, KVCache, stream_attention_mask
from engine.checkpoints import load_dit
from engine.generator import NoiseSource, StreamConfig, StreamingGenerator
from engine.model import PRESETS, CausalWanModel, Rope
from engine.sampler import FlowMatchSchedule, SamplerConfig

ROOT = Path(__file__).parent.parent
GOLDEN = Path(__file__).parent / "data" / "longlive-tiny"
TINY = PRESETS["tiny"]


class ReplayNoise(NoiseSource):
    """The reference's recorded draws: block noise slices and 3 re-noise draws per block."""

    def __init__(self, inputs: dict[str, torch.Tensor]):
        self.inputs = inputs

    def block_noise(self, shape, start_frame):
        return self.inputs["noise"][:, start_frame:start_frame + shape[1]]

    def renoise(self, shape, start_frame, step):
        return self.inputs["renoise"][(start_frame // 3) * 3 + step].unsqueeze(0)


@pytest.fixture(scope="module")
def golden():
    model = load_dit(TINY, GOLDEN / "longlive_base_tiny.pt")
    return model, load_file(GOLDEN / "inputs.safetensors"), load_file(GOLDEN / "expected.safetensors")


def _run(model, inputs, blocks=8, switch_frame=None, stream=None):
    gen = StreamingGenerator(model, stream=stream, noise_factory=lambda seed: ReplayNoise(inputs))
    gen.start(inputs["prompt_p0"], seed=0)
    out = []
    for _ in range(blocks):
        if gen.frame == switch_frame:
            gen.switch_prompt(inputs["prompt_p1"])
        out.append(gen.next_block())
    return torch.cat(out, dim=1), gen


def test_single_prompt_run_reproduces_the_reference_latents(golden):
    model, inputs, expected = golden
    latents, _ = _run(model, inputs)
    assert (latents - expected["latents_single"]).abs().max() < 1e-4


def test_kv_recache_switch_reproduces_the_reference_latents(golden):
    model, inputs, expected = golden
    latents, gen = _run(model, inputs, switch_frame=15)
    assert gen.recaches == 1
    assert (latents - expected["latents_switch_gs1"]).abs().max() < 1e-4
    # and the switch really changed the video from frame 15 on, not before
    diff = (latents - expected["latents_single"]).abs().amax(dim=(0, 2, 3, 4))
    assert diff[:15].max() < 1e-4 and diff[15:].min() > 1e-3


def test_warped_timesteps_are_the_references_floats():
    schedule = FlowMatchSchedule(shift=5.0)
    steps = schedule.step_timesteps((1000, 750, 500, 250), warp=True)
    assert steps.dtype == torch.float32
    assert torch.allclose(steps, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), atol=1e-3)
    sigmas = schedule.sigma(steps)
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.9375, 0.833333, 0.625]), atol=1e-5)


def test_unwarped_steps_are_used_as_given():
    steps = FlowMatchSchedule().step_timesteps((1000, 750, 500, 250), warp=False)
    assert steps.tolist() == [1000.0, 750.0, 500.0, 250.0]


def _random_model(cfg=TINY, seed=0) -> CausalWanModel:
    torch.manual_seed(seed)
    return CausalWanModel(cfg).eval().requires_grad_(False)


def test_cached_block_by_block_equals_one_masked_forward_over_all_frames():
    torch.manual_seed(1)
    cfg = TINY
    model = _random_model(cfg)
    fs, block, total = cfg.frame_seq_length, cfg.num_frame_per_block, 21  # 7 blocks: the window rolls 3 times
    latents = torch.randn(1, cfg.in_dim, total, cfg.latent_height, cfg.latent_width)
    prompt = torch.randn(1, cfg.text_len, cfg.text_dim)

    def text_cache():
        cache = CrossCache(cfg.num_layers, 1, cfg.text_len, cfg.num_heads, cfg.head_dim, torch.float32, "cpu")
        model.encode_text(prompt, cache)
        return cache

    stream = KVCache(cfg.num_layers, 1, cfg.local_attn_size, cfg.sink_size, fs, cfg.num_heads, cfg.head_dim,
                     torch.float32, "cpu")
    text = text_cache()
    streamed = []
    for b in range(total // block):
        plan, pointers = stream.plan(b * block * fs, block * fs, model.rope())
        x = latents[:, :, b * block:(b + 1) * block]
        streamed.append(model(x, torch.zeros(1, block), stream, plan, text))
        stream.commit(pointers)
    streamed = torch.cat(streamed, dim=2)

    whole = KVCache(cfg.num_layers, 1, total, 0, fs, cfg.num_heads, cfg.head_dim, torch.float32, "cpu")
    mask = stream_attention_mask(total, block, cfg.local_attn_size, cfg.sink_size, fs)
    plan, _ = whole.plan(0, total * fs, model.rope(), mask=mask)
    once = model(latents, torch.zeros(1, total), whole, plan, text_cache())
    assert (streamed - once).abs().max() < 1e-4


def _frame_tags(cache: KVCache) -> list[int]:
    """Which frame each buffer slot holds (values written as frame index + 1; 0 = empty)."""
    fs = cache.frame_seq_length
    v = cache.logical_view(cache.v)  # the ring in the order the reference's buffer holds it
    return [int(v[0, 0, s * fs, 0, 0]) - 1 for s in range(cache.capacity // fs)]


def _pass(cache: KVCache, rope: Rope, start_frame: int, frames: int, fs: int, **kw) -> None:
    plan, pointers = cache.plan(start_frame * fs, frames * fs, rope, **kw)
    tags = torch.arange(start_frame, start_frame + frames).repeat_interleave(fs).float() + 1
    v = tags.view(1, -1, 1, 1).expand(1, frames * fs, 1, 2)
    cache.update_and_read(0, v.clone(), v.clone(), plan)
    cache.commit(pointers)


def test_cache_timeline_matches_the_spec_worked_example():
    fs = 2
    rope = Rope(head_dim=2, max_frames=1024, grid=(1, 2), device=torch.device("cpu"))
    cache = KVCache(1, 1, frames=12, sink_frames=3, frame_seq_length=fs, heads=1, head_dim=2,
                    dtype=torch.float32, device="cpu")
    expected_after = {
        0: [0, 1, 2],
        1: [0, 1, 2, 3, 4, 5],
        2: list(range(9)),
        3: list(range(12)),
        4: [0, 1, 2, *range(6, 15)],
        5: [0, 1, 2, *range(9, 18)],
        6: [0, 1, 2, *range(12, 21)],
    }
    for b in range(7):
        for _ in range(5):  # 4 denoising passes + the context pass: only the first may roll
            _pass(cache, rope, 3 * b, 3, fs)
            assert cache.global_end == (3 * b + 3) * fs
        assert _frame_tags(cache)[: cache.frames_in_buffer()] == expected_after[b]
        assert cache.local_end == min(3 * b + 3, 12) * fs


def test_sink_frames_are_never_evicted():
    fs = 1
    rope = Rope(head_dim=2, max_frames=1024, grid=(1, 1), device=torch.device("cpu"))
    cache = KVCache(1, 1, frames=12, sink_frames=3, frame_seq_length=fs, heads=1, head_dim=2,
                    dtype=torch.float32, device="cpu")
    for b in range(40):
        _pass(cache, rope, 3 * b, 3, fs)
        assert _frame_tags(cache)[:3] == [0, 1, 2]


def _snapshot_switch(frame: int, global_sink: bool):
    """Run to `frame`, then recache under a new prompt; return (v before, v after, generator)."""
    model = _random_model()
    gen = StreamingGenerator(model, SamplerConfig(denoising_steps=(1000,)),
                             StreamConfig(global_sink=global_sink))
    torch.manual_seed(5)
    gen.start(torch.randn(1, TINY.text_len, TINY.text_dim), seed=0)
    while gen.frame < frame:
        gen.next_block()
    before = gen.kv.logical_view(gen.kv.v)
    pointers = (gen.kv.global_end, gen.kv.local_end, gen.kv.ring_offset)
    gen.recache(torch.randn(1, TINY.text_len, TINY.text_dim))
    assert (gen.kv.global_end, gen.kv.local_end, gen.kv.ring_offset) == pointers  # a recache never moves them
    # Layer 1: its inputs went through layer 0's cross-attention, so the prompt shows there
    # (layer 0's self-attention K/V depend on the latents only).
    changed = ((gen.kv.logical_view(gen.kv.v) - before).abs() > 1e-4).flatten(3).any(dim=3)[1, 0]
    fs = TINY.frame_seq_length
    return [bool(changed[s * fs:(s + 1) * fs].any()) for s in range(TINY.local_attn_size)], gen


def test_recache_with_global_sink_keeps_the_original_sink_after_the_window_fills():
    changed, _ = _snapshot_switch(15, global_sink=True)
    assert changed == [False] * 3 + [True] * 9


def test_recache_with_global_sink_rewrites_the_sink_when_the_switch_is_at_or_before_frame_12():
    changed, _ = _snapshot_switch(9, global_sink=True)
    assert changed[:9] == [True] * 9 and changed[9:] == [False] * 3  # 9 frames exist, all re-encoded


def test_recache_without_global_sink_reanchors_the_sink_on_the_oldest_recached_frame():
    changed, _ = _snapshot_switch(15, global_sink=False)
    assert changed == [True] * 12


def test_recache_without_global_sink_before_the_window_fills_rewrites_what_exists_and_zeroes_the_rest():
    changed, gen = _snapshot_switch(6, global_sink=False)
    assert changed[:6] == [True] * 6
    assert not gen.kv.v[:, :, 6 * TINY.frame_seq_length:].any()


def _latents(seed: int, blocks: int = 3) -> torch.Tensor:
    model = _random_model()
    gen = StreamingGenerator(model)
    torch.manual_seed(9)
    gen.start(torch.randn(1, TINY.text_len, TINY.text_dim), seed=seed)
    return torch.cat([gen.next_block() for _ in range(blocks)], dim=1)


def test_same_seed_gives_identical_output():
    assert torch.equal(_latents(3), _latents(3))


def test_different_seeds_give_different_output():
    assert not torch.allclose(_latents(3), _latents(4))


def test_block_shape_and_frame_counter():
    model = _random_model()
    gen = StreamingGenerator(model)
    gen.start(torch.randn(1, TINY.text_len, TINY.text_dim), seed=0)
    block = gen.next_block()
    assert block.shape == (1, 3, 16, TINY.latent_height, TINY.latent_width)
    assert gen.frame == 3


def test_next_block_before_start_is_refused():
    gen = StreamingGenerator(_random_model())
    with pytest.raises(RuntimeError, match="start"):
        gen.next_block()


def test_reset_forgets_the_stream():
    gen = StreamingGenerator(_random_model())
    gen.start(torch.randn(1, TINY.text_len, TINY.text_dim), seed=0)
    gen.next_block()
    gen.reset()
    assert gen.frame == 0 and gen.kv.global_end == 0 and not gen.kv.k.any()
    with pytest.raises(RuntimeError):
        gen.next_block()


def test_absolute_rope_refuses_to_run_past_its_table():
    gen = StreamingGenerator(_random_model(), SamplerConfig(denoising_steps=(1000,)))
    gen.start(torch.randn(1, TINY.text_len, TINY.text_dim), seed=0)
    gen.frame = 1023  # what 341 blocks would leave; only the position arithmetic matters here
    gen.kv.global_end = gen.kv.local_end = 0
    with pytest.raises(ValueError, match="relative"):
        gen.next_block()


def test_relative_rope_runs_past_1024_latent_frames_with_fixed_memory():
    gen = StreamingGenerator(_random_model(), SamplerConfig(denoising_steps=(1000,)),
                             StreamConfig(rope_mode="relative"))
    gen.start(torch.randn(1, TINY.text_len, TINY.text_dim), seed=0)
    buffers = [t.data_ptr() for t in (gen.kv.k, gen.kv.v, gen.history)]
    while gen.frame < 1030:
        block = gen.next_block()
        if gen.frame == 600:
            gen.switch_prompt(torch.randn(1, TINY.text_len, TINY.text_dim))
    assert gen.frame >= 1030
    assert torch.isfinite(block).all()
    assert gen.kv.local_end == gen.kv.capacity
    assert [t.data_ptr() for t in (gen.kv.k, gen.kv.v)] == buffers[:2]  # same static buffers throughout
    assert gen.history.shape[1] == TINY.local_attn_size


def test_relative_rope_matches_absolute_before_the_window_rolls():
    def run(mode):
        gen = StreamingGenerator(_random_model(), stream=StreamConfig(rope_mode=mode))
        torch.manual_seed(2)
        gen.start(torch.randn(1, TINY.text_len, TINY.text_dim), seed=0)
        return torch.cat([gen.next_block() for _ in range(4)], dim=1)

    # Slot index == absolute frame index until the first roll (12 frames).
    assert (run("relative") - run("absolute")).abs().max() < 1e-5


def test_sdpa_is_the_attention_backend_on_cpu():
    assert attention_backend("cpu", torch.float32) == "sdpa"
    assert attention_backend("cpu", torch.bfloat16) == "sdpa"


def test_geometry_follows_the_latent_size():
    cfg = PRESETS["1.3b"]
    assert cfg.frame_seq_length == 1560
    assert cfg.with_latent_size(40, 72).frame_seq_length == 720  # 320x576


def test_gpu_check_engine_mode_reports_load_first_block_fps_and_switches_on_the_cpu(tmp_path):
    # The script a GPU host runs, rehearsed at the tiny size: real files, real loaders, real loop.
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--mode", "engine", "--device", "cpu", "--size", "tiny",
         "--no-compile",
         "--blocks", "3", "--switches", "2", "--out", str(tmp_path), "--weights", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    eager = report["eager"]
    assert report["load_s"] > 0 and eager["first_block_s"] > 0 and eager["steady_fps_with_vae"] > 0
    assert eager["switches"] == 2 and 0 < eager["switch_p50_s"] <= eager["switch_p95_s"]
    assert (tmp_path / "w" / "LongLive-1.3B" / "models" / "lora.pt").is_file()
    table = (tmp_path / "gpu-check.md").read_text()
    assert "steady FPS with VAE decode" in table and "prompt switch p50 / p95" in table
