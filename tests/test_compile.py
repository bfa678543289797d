"""The compiled steady-state step on the CPU: one graph, no breaks, no recompiles, eager's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from engine.checkpoints import load_dit
from engine.generator import StreamConfig, StreamingGenerator
from engine.model import PRESETS
from engine.random_weights import random_dit
from tests.test_engine_core import ReplayNoise

TINY = PRESETS["tiny"]
GOLDEN = Path(__file__).parent / "data" / "longlive-tiny"
pytestmark = pytest.mark.timeout(900)  # Inductor builds C++ kernels for the CPU on first use


def _prompt(seed: int) -> torch.Tensor:
    return torch.randn(1, TINY.text_len, TINY.text_dim, generator=torch.Generator().manual_seed(seed))


def _stream(model, compile_mode, blocks: int, rope_mode: str = "relative"):
    """`blocks` blocks with prompt switches every 25 blocks and re-anchors every 40."""
    gen = StreamingGenerator(model, stream=StreamConfig(rope_mode=rope_mode), compile_mode=compile_mode)
    gen.start(_prompt(0), seed=0)
    out = []
    for b in range(blocks):
        if b and b % 25 == 0:
            gen.switch_prompt(_prompt(b))
        if b and b % 40 == 0:
            gen.request_reanchor()
        out.append(gen.next_block())
    return torch.cat(out, dim=1), gen


@pytest.fixture(scope="module")
def model():
    return random_dit(TINY, "cpu", torch.float32, seed=3)


def test_a_hundred_blocks_with_switches_and_reanchors_compile_once_without_breaks_and_match_eager(model):
    torch._dynamo.reset()
    counters.clear()
    compiled, gen = _stream(model, "default", 104)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    eager, _ = _stream(model, None, 104)
    assert breaks == 0
    assert graphs == 1  # compiled once, never again: no recompile across switches and re-anchors
    assert gen.steady_passes > 400 and gen.recaches == 4 and gen.reanchors == 2  # switches at 25, 50, 75, 100
    assert (compiled - eager).abs().max().item() <= 1e-5


def test_the_compiled_step_in_absolute_rope_mode_reproduces_the_reference_golden_latents():
    torch._dynamo.reset()
    model = load_dit(TINY, GOLDEN / "longlive_base_tiny.pt")
    inputs = load_file(GOLDEN / "inputs.safetensors")
    expected = load_file(GOLDEN / "expected.safetensors")
    gen = StreamingGenerator(model, noise_factory=lambda seed: ReplayNoise(inputs), compile_mode="default")
    gen.start(inputs["prompt_p0"], seed=0)
    latents = []
    for _ in range(8):
        if gen.frame == 15:
            gen.switch_prompt(inputs["prompt_p1"])
        latents.append(gen.next_block())
    assert gen.steady_passes > 0
    assert (torch.cat(latents, dim=1) - expected["latents_switch_gs1"]).abs().max() < 1e-4
