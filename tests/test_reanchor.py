"""The soft re-anchor: recent frames re-encoded as the sink on request, with a switch, on drift, by period."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from engine.cache import CrossCache, KVCache
from engine.generator import DRIFT_ANCHOR_BLOCKS, StreamConfig, StreamingGenerator
from engine.longlive import LongLiveEngine
from engine.model import PRESETS, CausalWanModel
from engine.preview import PreviewEngine
from engine.sampler import SamplerConfig
from engine.settings import EngineSettings
from tests.supervised import metric_values, run_supervised, supervised_preview, until
from tests.tiny_weights import HEIGHT, WIDTH, write_tiny_weights

TINY = PRESETS["tiny"]
FS = TINY.frame_seq_length
ONE_STEP = SamplerConfig(denoising_steps=(1000,))


def _model(seed: int = 0) -> CausalWanModel:
    torch.manual_seed(seed)
    return CausalWanModel(TINY).eval().requires_grad_(False)


def _prompt(seed: int) -> torch.Tensor:
    return torch.randn(1, TINY.text_len, TINY.text_dim, generator=torch.Generator().manual_seed(seed))


def _generator(model=None, sampler=ONE_STEP, **stream) -> StreamingGenerator:
    gen = StreamingGenerator(model or _model(), sampler, StreamConfig(**stream))
    gen.start(_prompt(1), seed=0)
    return gen


def _count_passes(model: torch.nn.Module) -> list[int]:
    """A counter of DiT forward passes, bumped by a hook."""
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("rope_mode", ["relative", "absolute"])
def test_reanchor_makes_the_recent_frames_the_sink_exactly_as_a_fresh_stream_would(rope_mode):
    model = _model()
    gen = _generator(model, rope_mode=rope_mode)
    for _ in range(6):  # frame 18: the window has rolled twice, the sink still holds frames 0-2
        gen.next_block()
    recent = gen.history.clone()
    old_sink = gen.kv.k[:, :, :TINY.sink_size * FS].clone()

    gen.reanchor()

    assert gen.frame == TINY.local_attn_size  # positions back near 0, whatever the mode
    assert gen.kv.global_end == gen.kv.local_end == TINY.local_attn_size * FS
    assert torch.equal(gen.history, recent)  # the clean history is kept
    assert gen.reanchors == 1 and gen.recaches == 0
    # A fresh stream re-encoding the same 12 latents block by block, at the context noise.
    fresh = KVCache(TINY.num_layers, 1, TINY.local_attn_size, TINY.sink_size, FS, TINY.num_heads,
                    TINY.head_dim, torch.float32, "cpu", rope_mode)
    text = CrossCache(TINY.num_layers, 1, TINY.text_len, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")
    model.encode_text(_prompt(1), text)
    block = TINY.num_frame_per_block
    for start in range(0, TINY.local_attn_size, block):
        plan, pointers = fresh.plan(start * FS, block * FS, model.rope())
        x = recent[:, start:start + block].permute(0, 2, 1, 3, 4)
        model(x, torch.zeros(1, block), fresh, plan, text)
        fresh.commit(pointers)
    assert (gen.kv.k - fresh.k).abs().max() < 1e-5
    assert (gen.kv.v - fresh.v).abs().max() < 1e-5
    # and the sink really moved: it now holds frames 6-8, not 0-2
    assert (gen.kv.k[:, :, :TINY.sink_size * FS] - old_sink).abs().max() > 1e-2


def test_generation_continues_after_a_reanchor_and_is_deterministic():
    def run(reanchor_at: int | None) -> torch.Tensor:
        gen = _generator(_model(), sampler=SamplerConfig(), rope_mode="relative")
        out = []
        for b in range(8):
            if b == reanchor_at:
                gen.request_reanchor()
            out.append(gen.next_block())
        return torch.cat(out, dim=1)

    a, b, plain = run(5), run(5), run(None)
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    frames_before = 5 * TINY.num_frame_per_block
    assert torch.equal(a[:, :frames_before], plain[:, :frames_before])  # applied at the boundary, not before
    assert (a[:, frames_before:] - plain[:, frames_before:]).abs().max() > 1e-3  # and it did change the cache


def test_switch_and_reanchor_at_the_same_boundary_run_one_set_of_passes():
    steps = len(ONE_STEP.denoising_steps)
    window_passes = TINY.local_attn_size // TINY.num_frame_per_block

    def passes_for_block(switch: bool, reanchor: bool) -> tuple[int, StreamingGenerator]:
        model = _model()
        gen = _generator(model)
        for _ in range(5):
            gen.next_block()
        calls = _count_passes(model)
        if switch:
            gen.switch_prompt(_prompt(2))
        if reanchor:
            gen.request_reanchor()
        gen.next_block()
        return calls[0], gen

    block_passes = steps + 1
    assert passes_for_block(False, False)[0] == block_passes
    assert passes_for_block(True, False)[0] == 1 + block_passes  # the switch's recache: one pass
    assert passes_for_block(False, True)[0] == window_passes + block_passes
    both, gen = passes_for_block(True, True)
    assert both == window_passes + block_passes  # not 1 + window_passes + block_passes
    assert gen.recaches == 0 and gen.reanchors == 1
    # and the re-anchor ran under the new prompt
    text = CrossCache(TINY.num_layers, 1, TINY.text_len, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")
    gen.model.encode_text(_prompt(2), text)
    assert torch.equal(gen.text.k, text.k)


def test_drift_score_stays_low_on_a_steady_stream_and_triggers_no_reanchor():
    gen = _generator(rope_mode="relative", drift_threshold=0.15)
    scores = []
    for _ in range(40):
        gen.next_block()
        scores.append(gen.drift)
    assert gen.reanchors == 0
    assert scores[:DRIFT_ANCHOR_BLOCKS] == [0.0] * DRIFT_ANCHOR_BLOCKS  # capturing the reference
    assert 0 < max(scores[DRIFT_ANCHOR_BLOCKS:]) < 0.1


def test_growing_latent_spread_triggers_a_reanchor_and_the_reference_is_recaptured():
    gen = _generator(rope_mode="relative", drift_threshold=0.15)
    flow_to_x0 = gen.schedule.flow_to_x0
    gain = [1.0]

    def creeping(flow, xt, timestep):  # contrast creep: the clean latents spread 10% more per block
        return flow_to_x0(flow, xt, timestep) * gain[0]

    gen.schedule.flow_to_x0 = creeping
    scores = []
    for b in range(20):
        if b >= 8:
            gain[0] *= 1.1
        gen.next_block()
        scores.append(gen.drift)
        if gen.reanchors:
            break
    assert gen.reanchors == 1, scores
    assert scores[-2] > 0.15  # the score crossed the threshold at the end of the block before
    assert gen.drift == 0.0  # a new reference is being captured after the re-anchor
    assert 10 <= len(scores) <= 16


def test_periodic_reanchor_keeps_an_absolute_rope_stream_going_past_1024_frames_with_flat_memory():
    gen = _generator(rope_mode="absolute", reanchor_every_blocks=100)
    buffers = [t.data_ptr() for t in (gen.kv.k, gen.kv.v, gen.history)]
    generated, highest, rss = 0, 0, []
    while generated < 1030:
        block = gen.next_block()
        generated += block.shape[1]
        highest = max(highest, gen.frame)
        if generated in (60, 1020):
            rss.append(_rss_bytes())
    assert gen.reanchors == 3
    assert highest == TINY.local_attn_size + 100 * TINY.num_frame_per_block  # never near 1024
    assert torch.isfinite(block).all()
    assert [t.data_ptr() for t in (gen.kv.k, gen.kv.v, gen.history)] == buffers
    assert rss[1] - rss[0] < 16 * 2**20, rss


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_reanchor_before_the_first_block_is_a_no_op():
    gen = _generator()
    gen.reanchor()
    assert gen.reanchors == 0 and gen.frame == 0
    assert gen.next_block().shape[1] == TINY.num_frame_per_block


def test_longlive_switch_with_reanchor_costs_one_pass_set(tmp_path):
    paths = write_tiny_weights(tmp_path / "weights")
    settings = EngineSettings(backend="longlive", width=WIDTH, height=HEIGHT, weights_dir=paths.root,
                              device="cpu", steps=[1000, 500])
    engine = LongLiveEngine(settings)
    engine.start("a calm lake", seed=0)
    for _ in range(5):
        engine.next_block()
    calls = _count_passes(engine.generator.model)
    engine.switch_prompt("a storm at sea")
    engine.reanchor()
    frames = engine.next_block()
    assert frames.shape == (12, HEIGHT, WIDTH, 3)
    assert calls[0] == TINY.local_attn_size // TINY.num_frame_per_block + len(settings.steps) + 1
    assert engine.reanchors == 1 and engine.recaches == 0
    assert engine.drift == 0.0  # re-capturing its reference after the re-anchor


def test_preview_reanchor_restarts_its_clock_without_changing_a_single_frame():
    plain, anchored = (PreviewEngine(96, 64, transition_frames=20) for _ in range(2))
    for engine in (plain, anchored):
        engine.start("a calm ocean at sunset", seed=3)
    for b in range(10):
        if b == 3:
            anchored.reanchor()
        if b == 5:  # a switch and a re-anchor at the same boundary, then one mid-transition
            for engine in (plain, anchored):
                engine.switch_prompt("neon city at night")
            anchored.reanchor()
        if b == 6:
            anchored.reanchor()
        a, p = anchored.next_block(), plain.next_block()
        assert np.abs(a.astype(np.int16) - p).max() <= 1, b
    assert anchored.reanchors == 3 and plain.reanchors == 0
    assert anchored._origin == anchored.first_block_frames + 5 * anchored.block_frames


def test_supervisor_reanchor_and_switch_with_reanchor_reach_the_engine_and_the_metrics():
    settings = EngineSettings(backend="preview", width=64, height=48, fps=16, prompt="a red fire")
    with supervised_preview(settings) as (supervisor, metrics):

        async def scenario() -> dict:
            await until(lambda: supervisor.block >= 2)
            supervisor.reanchor()
            await until(lambda: supervisor.reanchors == 1)
            supervisor.switch_prompt("a deep blue ocean", reanchor=True)
            await until(lambda: supervisor.reanchors == 2)
            return supervisor.status()

        status = run_supervised(supervisor, scenario)
    values = metric_values(metrics)
    assert status["reanchors"] == 2 and status["drift"] == 0.0
    assert values["promptcast_reanchors_total"] == 2
    assert values["promptcast_recaches_total"] == 0  # the preview has no recache; the switch rode along
    assert "promptcast_engine_drift" in values

