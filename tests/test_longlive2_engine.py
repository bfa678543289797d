"""LongLive 2.0 engine core vs the reference: longlive2-tiny golden vectors, 5B key list, cache, UniPC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoints import load_dit
from engine.generator import NoiseSource
from engine.longlive2.cache import ShotKVCache
from engine.longlive2.generator import ShotGenerator, ShotStreamConfig
from engine.longlive2.model import PRESETS, ShotRope, at_size, build_random
from engine.longlive2.unipc import UniPC, UniPCBlock, UniPCConfig, schedule
from engine.model import CausalWanModel, keeps_fp32, parameter_count

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "longlive2-tiny"
TINY = PRESETS["tiny"]
TOL = 1e-4  # the golden README's tolerance (max |diff| on every latent tensor)


class ReplayNoise(NoiseSource):
    """The reference's initial noise: block b starts from frames 8b..8b+7."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise

    def block_noise(self, shape, start_frame):
        return self.noise[:, start_frame:start_frame + shape[1]]


@pytest.fixture(scope="module")
def golden():
    config = json.loads((GOLDEN / "config.json").read_text())
    model = load_dit(TINY, GOLDEN / "model_tiny_fp32.pt")  # the 2.0 generator checkpoint layout
    return model, config, load_file(GOLDEN / "inputs.safetensors"), load_file(GOLDEN / "expected.safetensors")


def _run(golden, run: str, record: list | None = None):
    """One golden run: the per-block prompt schedule of config.json, switches in the reference's mode."""
    model, config, inputs, _ = golden
    prompts = config["runs"][run]
    gen = ShotGenerator(model, noise_factory=lambda seed: ReplayNoise(inputs["noise"]))
    gen.start(inputs[prompts[0]], seed=0)
    out = []
    for b, name in enumerate(prompts):
        if b and name != prompts[b - 1]:
            gen.switch_prompt(inputs[name], cut=name.endswith("_cut"))
        out.append(gen.next_block())
    return torch.cat(out, dim=1), gen


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_sampler_timesteps_and_sigmas_match_the_reference():
    sigmas, timesteps = schedule(UniPCConfig())
    golden_sampler = json.loads((GOLDEN / "config.json").read_text())["sampler"]
    assert timesteps == golden_sampler["timesteps"] == [999, 937, 833, 624]
    assert sigmas == pytest.approx(golden_sampler["sigmas"], abs=1e-7)


def test_single_prompt_run_reproduces_the_reference(golden, monkeypatch):
    x0s, flows = [], []
    original = UniPCBlock.step

    def recording(self, index, flow, sample):
        out = original(self, index, flow, sample)
        x0s.append(out[1])
        flows.append(flow)
        return out

    monkeypatch.setattr(UniPCBlock, "step", recording)
    latents, gen = _run(golden, "single")
    expected = golden[3]
    assert _max_diff(torch.stack(flows[:4]), expected["flow_block0_single"]) < TOL
    assert _max_diff(torch.stack(x0s).view(6, 4, *x0s[0].shape), expected["x0_steps_single"]) < TOL
    assert _max_diff(latents, expected["latents_single"]) < TOL
    assert (gen.kv.global_end, gen.kv.local_end, gen.kv.pinned_start, gen.kv.pinned_len) == (288, 192, -1, 0)


def test_prompt_change_run_reproduces_the_reference(golden):
    latents, gen = _run(golden, "switch")
    assert _max_diff(latents, golden[3]["latents_switch"]) < TOL
    assert gen.recaches == 0 and gen.shot_cuts == 0


def test_shot_cut_run_reproduces_the_reference_pin_and_offset(golden):
    latents, gen = _run(golden, "shotcut")
    assert _max_diff(latents, golden[3]["latents_shotcut"]) < TOL
    # The pinned block moved left with two evictions and now sits right after the global sink.
    assert (gen.kv.global_end, gen.kv.local_end, gen.kv.pinned_start, gen.kv.pinned_len) == (288, 192, 48, 48)
    assert gen.shot_cuts == 1 and gen.rope_offset == 8
    # The buffer holds, in order: block 0 (global sink), block 2 (the shot sink), blocks 4 and 5.
    assert [s.rope_frame for s in gen.slots] == [0, 16 + 8, 32 + 8, 40 + 8]


def test_recache_switch_rewrites_the_window_and_changes_the_next_block(golden):
    model, _, inputs, expected = golden
    gen = ShotGenerator(model, stream=ShotStreamConfig(switch_mode="recache"),
                        noise_factory=lambda seed: ReplayNoise(inputs["noise"]))
    gen.start(inputs["prompt_p0"], seed=0)
    blocks = [gen.next_block() for _ in range(3)]
    sink_k = gen.kv.k[:, :, :48].clone()
    local_k = gen.kv.k[:, :, 48:144].clone()
    gen.switch_prompt(inputs["prompt_p1"])
    blocks.append(gen.next_block())
    assert gen.recaches == 1
    assert torch.equal(gen.kv.k[:, :, :48], sink_k)  # the global sink keeps the first prompt
    assert not torch.allclose(gen.kv.k[:, :, 48:144], local_k)
    # Before the switch the run equals the reference; after it, it is neither p0 nor the no-recache p1.
    first = torch.cat(blocks[:3], dim=1)
    assert _max_diff(first, expected["latents_single"][:, :24]) < TOL
    assert _max_diff(blocks[3], expected["latents_switch"][:, 24:32]) > 1e-3


def test_recache_of_an_unchanged_prompt_leaves_the_cache_as_generated(golden):
    model, _, inputs, _ = golden
    gen = ShotGenerator(model, noise_factory=lambda seed: ReplayNoise(inputs["noise"]))
    gen.start(inputs["prompt_p0"], seed=0)
    for _ in range(4):  # a full window, no roll yet: every block sees what it saw when generated
        gen.next_block()
    before = gen.kv.k[:, :, :gen.kv.local_end].clone()
    gen.recache()
    assert (gen.kv.k[:, :, :gen.kv.local_end] - before).abs().max() < 1e-5


def test_image_start_clamps_frame_zero_and_conditions_the_block(golden):
    model, _, inputs, expected = golden
    image = torch.randn(1, 1, 48, 4, 6, generator=torch.Generator().manual_seed(5))
    gen = ShotGenerator(model, noise_factory=lambda seed: ReplayNoise(inputs["noise"]))
    gen.start(inputs["prompt_p0"], seed=0, image_latent=image)
    first = gen.next_block()
    assert torch.equal(first[:, :1], image)
    assert _max_diff(first[:, 1:], expected["latents_single"][:, 1:8]) > 1e-3
    with pytest.raises(ValueError, match="image latent"):
        gen.start(inputs["prompt_p0"], seed=0, image_latent=image[:, :, :16])


def test_reanchor_replays_the_window_from_frame_zero(golden):
    model, _, inputs, _ = golden
    gen = ShotGenerator(model, noise_factory=lambda seed: ReplayNoise(inputs["noise"]))
    gen.start(inputs["prompt_p0"], seed=0)
    for _ in range(5):
        gen.next_block()
    gen.request_reanchor()
    gen.next_block()
    assert gen.reanchors == 1
    # 4 cached blocks replayed at frames 0..31 (a full window), then the new block rolled out the second.
    assert [s.rope_frame for s in gen.slots] == [0, 16, 24, 32]
    assert gen.frame == 40 and gen.kv.local_end == 4 * 8 * 6


def test_unipc_reduces_to_the_final_x0_and_is_deterministic():
    torch.manual_seed(0)
    sampler = UniPC()
    x = torch.randn(1, 8, 4, 2, 2)
    runs = []
    for _ in range(2):
        block, y = sampler.block(), x
        for i in range(4):
            y, x0 = block.step(i, 0.3 * y, y)
        runs.append((y, x0))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][0], runs[0][1])


def test_the_5b_architecture_builds_on_meta_and_matches_the_key_list():
    reference = json.loads((DATA / "wan2.2-ti2v-5b-dit-keys.json").read_text())
    keys = reference["keys"]
    expected = ({k: tuple(v) for k, v in keys.items()} if isinstance(keys, dict)
                else {e["key"]: tuple(e["shape"]) for e in keys})
    with torch.device("meta"):
        model = CausalWanModel(PRESETS["5b"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected
    assert len(shapes) == reference["num_tensors"] == 825
    assert parameter_count(PRESETS["5b"]) == reference["total_params"] == 4_999_787_712


def test_sizes_default_1280x704_and_scale_tokens_with_the_area():
    assert (PRESETS["5b"].latent_width * 16, PRESETS["5b"].latent_height * 16) == (1280, 704)
    assert PRESETS["5b"].frame_seq_length == 880
    assert at_size(PRESETS["5b"], 832, 480).frame_seq_length == 26 * 15
    with pytest.raises(ValueError, match="multiples of 32"):
        at_size(PRESETS["5b"], 848, 480)


def test_random_build_allocates_in_the_compute_dtype_with_fp32_islands():
    model = build_random(TINY, "cpu", torch.bfloat16)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if keeps_fp32(name) else torch.bfloat16), name
        assert torch.isfinite(param.float()).all()


def test_shot_rope_grows_past_the_reference_table_with_the_same_angles():
    rope = ShotRope(32, 16, (2, 3), "cpu")
    far_cos, _ = rope.angles(20, 2)
    fresh = ShotRope(32, 64, (2, 3), "cpu")
    assert torch.equal(far_cos, fresh.angles(20, 2)[0]) and rope.max_frames >= 22


def test_floating_pin_moves_with_eviction_and_merges_into_the_sink():
    fs, rope = 1, ShotRope(32, 64, (1, 1), "cpu")
    cache = ShotKVCache(1, 1, 4, 1, fs, 1, 32, torch.float32, "cpu")
    k = torch.zeros(1, 1, 1, 32)

    def block(frame):
        plan = cache.shot_plan(frame, 1, rope.angles(frame, 1))
        cache.update_and_read(0, k + frame, k + frame, plan)
        cache.commit(plan)

    for f in range(3):
        block(f)
    cache.pin_last(1, 1)  # frame 2 at slot 2
    block(3)
    block(4)  # evicts frame 1; the pin floats from 2 to 1, right after the sink
    assert (cache.pinned_start, cache.effective_sink) == (1, 2)
    block(5)  # now frame 3 is evicted, the pinned frame 2 stays
    assert cache.v[0, 0, :4, 0, 0].tolist() == [0.0, 2.0, 4.0, 5.0]
