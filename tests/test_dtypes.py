"""The engine in the dtypes a GPU host runs (bf16, fp16) against fp32, on the CPU.

Tolerances are the measured bf16/fp16-vs-fp32 differences at test size with about a 2x
margin (docs/engine.md, "dtype policy"). For scale: the reference's own bf16-vs-fp32
difference in the latents at this size is about 0.05.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoints import load_dit, read_checkpoint
from engine.generator import StreamingGenerator
from engine.model import PRESETS, CausalWanModel, keeps_fp32, parameter_count
from engine.text_encoder import PromptTokenizer, TextEncoder, load_umt5
from engine.vae import StreamingDecoder, VAEConfig, load_vae_decoder
from tests.test_engine_core import ReplayNoise

DATA = Path(__file__).parent / "data"
TINY = PRESETS["tiny"]
LOW = (torch.bfloat16, torch.float16)
# (max |diff|, mean |diff|) allowed against the fp32 run; measured: DiT bf16 0.023 / 0.0037,
# fp16 0.0028 / 0.00044; VAE bf16 0.156 / 0.0096, fp16 0.019 / 0.0012 (pixels in [-1, 1]);
# UMT5 bf16 0.044 / 0.0040, fp16 0.0050 / 0.00046 (outputs up to 5.2 in magnitude).
TOLERANCE = {
    "dit": {torch.bfloat16: (0.05, 0.008), torch.float16: (0.006, 0.001)},
    "vae": {torch.bfloat16: (0.3, 0.02), torch.float16: (0.04, 0.003)},
    "umt5": {torch.bfloat16: (0.09, 0.008), torch.float16: (0.01, 0.001)},
}


def _within(out: torch.Tensor, ref: torch.Tensor, tolerance: tuple[float, float]) -> None:
    assert torch.isfinite(out).all()
    diff = (out.float() - ref.float()).abs()
    assert diff.max().item() <= tolerance[0] and diff.mean().item() <= tolerance[1], \
        f"max {diff.max().item():.4g}, mean {diff.mean().item():.4g} > {tolerance}"


def _dit_run(dtype: torch.dtype) -> torch.Tensor:
    """The golden prompt-switch run (8 blocks, switch at frame 15) in `dtype`."""
    inputs = load_file(DATA / "longlive-tiny" / "inputs.safetensors")
    model = load_dit(TINY, DATA / "longlive-tiny" / "longlive_base_tiny.pt", dtype=dtype)
    gen = StreamingGenerator(model, noise_factory=lambda seed: ReplayNoise(inputs))
    gen.start(inputs["prompt_p0"], seed=0)
    out = []
    for _ in range(8):
        if gen.frame == 15:
            gen.switch_prompt(inputs["prompt_p1"])
        out.append(gen.next_block())
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def dit_fp32() -> torch.Tensor:
    return _dit_run(torch.float32)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_dit_stream_with_a_recache_in_low_precision_stays_within_tolerance_of_fp32(dit_fp32, dtype):
    _within(_dit_run(dtype), dit_fp32, TOLERANCE["dit"][dtype])


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_dit_keeps_norms_modulation_and_time_embedding_in_fp32(dtype):
    model = CausalWanModel(TINY).cast(dtype)
    named = dict(model.named_parameters())
    assert {k for k, p in named.items() if p.dtype == torch.float32} == {k for k in named if keeps_fp32(k)}
    assert model.dtype == dtype and model.blocks[0].ffn[0].weight.dtype == dtype


def test_fp32_islands_are_about_one_percent_of_the_1_3b_model():
    with torch.device("meta"):
        model = CausalWanModel(PRESETS["1.3b"])
    islands = sum(p.numel() for k, p in model.named_parameters() if keeps_fp32(k))
    assert 0 < islands / parameter_count(PRESETS["1.3b"]) < 0.013  # 17.4 M of 1,419 M: 1.2 %


def _vae_run(dtype: torch.dtype) -> torch.Tensor:
    path = DATA / "wan-vae-tiny" / "vae_tiny.pth"
    decoder = load_vae_decoder(path, VAEConfig.from_state_dict(read_checkpoint(path)), dtype=dtype)
    latents = load_file(DATA / "wan-vae-tiny" / "latents.safetensors")["latents"]
    return StreamingDecoder(decoder).decode_video_float(latents)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_vae_decode_in_low_precision_stays_within_tolerance_of_fp32(dtype):
    _within(_vae_run(dtype), _vae_run(torch.float32), TOLERANCE["vae"][dtype])


def _umt5_run(dtype: torch.dtype) -> torch.Tensor:
    inputs = load_file(DATA / "umt5-tiny" / "inputs.safetensors")
    encoder = load_umt5(DATA / "umt5-tiny" / "umt5_tiny.pth", "tiny", dtype=dtype)
    with torch.inference_mode():
        return encoder(inputs["ids"], inputs["mask"])


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_umt5_in_low_precision_stays_within_tolerance_of_fp32(dtype):
    out = _umt5_run(dtype)
    assert out.dtype == dtype
    _within(out, _umt5_run(torch.float32), TOLERANCE["umt5"][dtype])


def test_cpu_text_encoder_runs_in_fp32_beside_a_bf16_model_without_a_second_copy():
    pytest.importorskip("tokenizers")
    pytest.importorskip("ftfy")
    text = TextEncoder.from_files(DATA / "umt5-tiny" / "umt5_tiny.pth", DATA / "umt5-tiny", "tiny",
                                  device="cpu", dtype=torch.bfloat16, placement="cpu")
    weights = {p.data_ptr() for p in text.encoder.parameters()}
    out = text.encode("a red fox in the snow")
    assert {p.dtype for p in text.encoder.parameters()} == {torch.float32}
    assert out.dtype == torch.bfloat16  # only the result takes the model's dtype
    assert {p.data_ptr() for p in text.encoder.parameters()} == weights  # never converted after loading


def test_text_encoder_refuses_an_encoder_away_from_its_placement():
    pytest.importorskip("tokenizers")
    pytest.importorskip("ftfy")
    encoder = load_umt5(DATA / "umt5-tiny" / "umt5_tiny.pth", "tiny", device="meta")
    tokenizer = PromptTokenizer.from_dir(DATA / "umt5-tiny", text_len=encoder.cfg.text_len)
    with pytest.raises(ValueError, match="placement 'cpu' needs the encoder on cpu"):
        TextEncoder(encoder, tokenizer, device="cpu", dtype=torch.float32, placement="cpu")
