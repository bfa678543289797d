"""The Wan2.2 VAE: official key layout, streaming decode = whole decode (29 then 32 frames), image encode."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoints import CheckpointError
from engine.longlive2.vae import (
    PRESETS,
    StreamingDecoder22,
    load_vae22,
    patchify,
    unpatchify,
    vae_shapes,
)
from tests.tiny_weights2 import DATA, write_tiny_vae22


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    path = write_tiny_vae22(tmp_path_factory.mktemp("vae22") / "Wan2.2_VAE.pth")
    decoder, encoder = load_vae22(path)
    return path, decoder, encoder


def test_decoder_and_encoder_match_the_upstream_wan22_vae(vae):
    _, decoder, encoder = vae
    inputs = load_file(DATA / "wan22-vae-tiny" / "inputs.safetensors")
    expected = load_file(DATA / "wan22-vae-tiny" / "expected.safetensors")
    with torch.no_grad():
        pixels = decoder(inputs["z"], decoder.new_cache())  # one call: the reference's whole-video decode
        mu = encoder.encode_pixels(inputs["image"])
    assert (pixels - expected["pixels"]).abs().max() < 1e-4
    assert (mu - expected["mu"]).abs().max() < 1e-4


def test_the_full_size_vae_has_wan22s_layout():
    shapes = vae_shapes(PRESETS["wan2.2"])
    assert shapes["decoder.conv1.weight"] == (1024, 48, 3, 3, 3)
    assert shapes["decoder.head.2.weight"] == (12, 256, 3, 3, 3)
    assert shapes["encoder.conv1.weight"] == (160, 12, 3, 3, 3)
    assert shapes["conv1.weight"] == (96, 96, 1, 1, 1) and shapes["conv2.weight"] == (48, 48, 1, 1, 1)
    # Up stages keep their width in the upsampler conv (Wan2.1 halves it) and time doubles in the first two.
    assert shapes["decoder.upsamples.0.upsamples.3.resample.1.weight"] == (1024, 1024, 3, 3)
    assert shapes["decoder.upsamples.0.upsamples.3.time_conv.weight"] == (2048, 1024, 3, 1, 1)
    assert "decoder.upsamples.2.upsamples.3.time_conv.weight" not in shapes
    assert shapes["encoder.downsamples.1.downsamples.2.time_conv.weight"] == (320, 320, 3, 1, 1)


def test_streaming_decode_equals_the_whole_video_and_gives_29_then_32_frames(vae):
    _, decoder, _ = vae
    latents = torch.randn(1, 16, 48, 2, 3, generator=torch.Generator().manual_seed(1))
    stream = StreamingDecoder22(decoder)
    whole = stream.decode_video_float(latents)
    assert whole.shape == (1, 4 * 16 - 3, 3, 32, 48)
    stream.reset()
    blocks = [stream.decode_block_float(latents[:, i:i + 8]) for i in range(0, 16, 8)]
    assert [b.shape[1] for b in blocks] == [29, 32]
    assert torch.equal(torch.cat(blocks, dim=1), whole)
    assert whole.abs().max() <= 1 and whole.std() > 0.05  # clamped, and not a constant picture


def test_a_fresh_video_after_reset_starts_with_a_single_frame_again(vae):
    _, decoder, _ = vae
    stream = StreamingDecoder22(decoder)
    latents = torch.randn(1, 8, 48, 2, 3)
    first = stream.decode_block(latents)
    stream.reset()
    again = stream.decode_block(latents)
    assert first.shape == (29, 32, 48, 3) and first.dtype == torch.uint8
    assert torch.equal(first, again)


def test_streaming_uses_history_so_a_later_block_differs_from_a_fresh_decode(vae):
    _, decoder, _ = vae
    latents = torch.randn(1, 16, 48, 2, 3)
    stream = StreamingDecoder22(decoder)
    stream.decode_block_float(latents[:, :8])
    second = stream.decode_block_float(latents[:, 8:])
    stream.reset()
    fresh = stream.decode_block_float(latents[:, 8:])
    assert not torch.allclose(second[:, -29:], fresh)


def test_patchify_round_trips_and_matches_wans_channel_order():
    x = torch.arange(2 * 1 * 2 * 4, dtype=torch.float32).view(1, 2, 1, 2, 4)
    p = patchify(x)
    assert p.shape == (1, 8, 1, 1, 2)
    # channel c*4 + r*2 + q holds pixel (row q, column r) of each 2x2 patch
    assert p[0, 1 * 4 + 1 * 2 + 0, 0, 0, 1].item() == x[0, 1, 0, 0, 3].item()
    assert torch.equal(unpatchify(p), x)


def test_image_encoder_gives_one_normalised_latent_frame(vae):
    _, _, encoder = vae
    image = torch.randint(0, 256, (32, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    latent = encoder(image)
    assert latent.shape == (1, 1, 48, 2, 3) and torch.isfinite(latent).all()
    assert torch.equal(latent, encoder(image))
    assert not torch.allclose(latent, encoder(255 - image))


def test_a_vae_file_with_a_missing_key_is_refused_naming_it(vae, tmp_path):
    path, _, _ = vae
    state = torch.load(path, weights_only=True)
    del state["decoder.head.2.weight"]
    broken = tmp_path / "Wan2.2_VAE.pth"
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match=r"decoder\.head\.2\.weight"):
        load_vae22(broken)
