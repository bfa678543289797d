"""The Wan2.1 VAE decoder and streaming decode (engine-spec §7), against the reference's own output.

`tests/data/wan-vae-tiny/` (see its README) holds a tiny random VAE in the official
`Wan2.1_VAE.pth` layout (encoder keys included), 7 normalised latents and the pixels the
reference Wan2.1 code decodes them to, plus the full-size key list of the reference model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoints import CheckpointError
from engine.vae import (
    FIRST_FRAME_SEEN,
    PRESETS,
    CausalConv3d,
    StreamingDecoder,
    WanVAEDecoder,
    decoder_shapes,
    load_vae_decoder,
    to_uint8,
)

DATA = Path(__file__).parent / "data" / "wan-vae-tiny"
TINY_PTH = DATA / "vae_tiny.pth"
TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def decoder() -> WanVAEDecoder:
    return load_vae_decoder(TINY_PTH, TINY)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return {**load_file(DATA / "latents.safetensors"), **load_file(DATA / "expected.safetensors")}


@pytest.fixture(scope="module")
def twelve_latents() -> torch.Tensor:
    return torch.randn(1, 12, 16, 4, 6, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def streamed(decoder, twelve_latents) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The 12 latents decoded in one call and as 4 blocks of 3 with one cache."""
    whole = StreamingDecoder(decoder).decode_video_float(twelve_latents)
    stream = StreamingDecoder(decoder)
    blocks = [stream.decode_block_float(twelve_latents[:, i:i + 3]) for i in range(0, 12, 3)]
    return whole, blocks


def _tiny_state() -> dict[str, torch.Tensor]:
    return torch.load(TINY_PTH, map_location="cpu", weights_only=True)


def test_reproduces_reference_pixels(decoder, golden):
    video = StreamingDecoder(decoder).decode_video_float(golden["latents"])
    assert video.shape == golden["video"].shape == (1, 25, 3, 32, 48)
    assert (video - golden["video"]).abs().max().item() <= 1e-4


def test_uint8_frames_match_longlive_saved_video(decoder, golden):
    frames = StreamingDecoder(decoder).decode_video(golden["latents"])
    assert frames.dtype == torch.uint8 and frames.shape == (25, 32, 48, 3) and frames.is_contiguous()
    # Truncation near integer boundaries could flip by one with another BLAS; here it is exact.
    assert (frames.int() - golden["frames_uint8"].int()).abs().max().item() <= 1


def test_uint8_mapping_truncates_like_write_video():
    values = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 2.0])
    out = to_uint8(values.view(1, 1, 7, 1).expand(1, 3, 7, 1))  # [T=1, 3, H=7, W=1]
    assert out.shape == (1, 7, 1, 3)
    assert out[0, :, 0, 0].tolist() == [0, 0, 127, 191, 254, 255, 255]


def test_streaming_blocks_equal_whole_video(streamed):
    whole, blocks = streamed
    assert (torch.cat(blocks, dim=1) - whole).abs().max().item() <= 1e-5


def test_first_block_gives_9_frames_later_blocks_12(streamed):
    _, blocks = streamed
    assert [b.shape[1] for b in blocks] == [9, 12, 12, 12]
    assert [TINY.pixel_frames(3, first=i == 0) for i in range(4)] == [9, 12, 12, 12]


def test_reset_clears_the_cache(decoder, twelve_latents, streamed):
    _, blocks = streamed
    stream = StreamingDecoder(decoder)
    stream.decode_block_float(twelve_latents[:, :3])
    stream.decode_block_float(twelve_latents[:, 3:6])
    assert all(isinstance(c, torch.Tensor) and c.shape[2] == 2 for c in stream.cache)
    stream.reset()
    assert stream.cache == [None] * decoder.decoder.num_cache_slots and stream.latents_decoded == 0
    again = stream.decode_block_float(twelve_latents[:, :3])
    assert again.shape[1] == 9 and torch.equal(again, blocks[0])


def test_first_latent_takes_the_rep_path(decoder, twelve_latents):
    stream = StreamingDecoder(decoder)
    assert stream.decode_block_float(twelve_latents[:, :1]).shape[1] == 1
    time_slots = [m.time_conv.slot for m in decoder.modules() if getattr(m, "time_conv", None) is not None]
    assert len(time_slots) == 2 and all(stream.cache[s] is FIRST_FRAME_SEEN for s in time_slots)
    assert stream.decode_block_float(twelve_latents[:, 1:2]).shape[1] == 4


def test_decode_block_rejects_bad_latents(decoder, twelve_latents):
    stream = StreamingDecoder(decoder)
    with pytest.raises(ValueError, match="16"):
        stream.decode_block(twelve_latents[:, :3, :8])
    with pytest.raises(ValueError, match="B = 1"):
        stream.decode_block(twelve_latents[:, :3].expand(2, -1, -1, -1, -1))


def test_bf16_decode_follows_fp32(golden):
    dec = load_vae_decoder(TINY_PTH, TINY, dtype=torch.bfloat16)
    assert dec.conv2.weight.dtype == torch.bfloat16
    video = StreamingDecoder(dec).decode_video_float(golden["latents"])
    assert video.dtype == torch.float32
    assert (video - golden["video"]).abs().mean().item() < 0.03


def test_encoder_keys_are_skipped(decoder):
    state = _tiny_state()
    assert any(k.startswith("encoder.") for k in state) and "conv1.weight" in state
    decoder_keys = {k for k in state if k.startswith(("decoder.", "conv2."))}
    assert set(decoder.state_dict()) == decoder_keys
    assert len(state) == 194 and len(decoder_keys) == 108


def _corrupt(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / "Wan2.1_VAE.pth"
    state = _tiny_state()
    if kind == "missing key":
        del state["decoder.upsamples.3.time_conv.weight"]
    elif kind == "wrong shape":
        state["decoder.head.2.weight"] = torch.zeros(3, 4, 1, 3, 3)
    elif kind == "unexpected key":
        state["decoder.extra.weight"] = torch.zeros(1)
    elif kind == "encoder only":
        state = {k: v for k, v in state.items() if k.startswith(("encoder.", "conv1."))}
    if kind != "missing file":
        torch.save(state, path)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(("kind", "says"), [
    ("missing key", "decoder.upsamples.3.time_conv.weight"),
    ("wrong shape", "decoder.head.2.weight"),
    ("unexpected key", "decoder.extra.weight"),
    ("encoder only", "no decoder keys"),
    ("truncated", "truncated"),
    ("missing file", "not found"),
])
def test_loader_errors_name_the_file(kind, says, tmp_path):
    path = _corrupt(kind, tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_vae_decoder(path, TINY)
    assert str(path) in str(err.value) and says in str(err.value)


def test_wan21_decoder_keys_match_the_reference():
    shapes = decoder_shapes(PRESETS["wan2.1"])
    ref = json.loads((DATA / "wan2.1-vae-keys.json").read_text())
    ref_decoder = {k: tuple(v) for k, v in ref["keys"].items() if k.startswith(("decoder.", "conv2."))}
    assert shapes == ref_decoder
    assert len(shapes) == 108 and sum(torch.Size(s).numel() for s in shapes.values()) == 73_295_603
    assert len(ref["keys"]) - len(shapes) == 86  # encoder.* and conv1.* tensors, skipped
    assert shapes["decoder.conv1.weight"] == (384, 16, 3, 3, 3)
    assert shapes["decoder.middle.1.norm.gamma"] == (384, 1, 1)
    assert shapes["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert shapes["decoder.upsamples.4.shortcut.weight"] == (384, 192, 1, 1, 1)
    assert shapes["decoder.upsamples.11.resample.1.weight"] == (96, 192, 3, 3)
    assert shapes["decoder.head.2.weight"] == (3, 96, 3, 3, 3)
    with torch.device("meta"):
        model = WanVAEDecoder(PRESETS["wan2.1"])
    convs = [m for m in model.decoder.modules() if isinstance(m, CausalConv3d)]
    assert len(convs) == 33 and model.decoder.num_cache_slots == 32


def test_full_size_file_loads_and_decodes(tmp_path):
    """The official key set and shapes (stride-0 tensors: a file of ~60 kB) through the real loader."""
    ref = json.loads((DATA / "wan2.1-vae-keys.json").read_text())
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({k: torch.full((), 0.01).expand(*s) for k, s in ref["keys"].items()}, path)
    model = load_vae_decoder(path)
    frames = StreamingDecoder(model).decode_video(torch.randn(1, 2, 16, 2, 2))
    assert frames.shape == (5, 16, 16, 3) and frames.dtype == torch.uint8
