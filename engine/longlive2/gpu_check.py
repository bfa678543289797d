"""LongLive 2.0 full-pipeline check for a CUDA host: speed per block, both switch kinds, memory.

    python -m engine.longlive2.gpu_check [--width 1280 --height 704] [--blocks 12] [--fp8]

Random weights (no download): the 5B DiT built directly in bf16, the Wan2.2 VAE decoder with
the streaming decode, an I2V start latent from the VAE encoder; `--blocks` blocks with a
`prompt` switch, a shot cut and a `recache` switch. Prints DiT-only and DiT + VAE FPS, the
recache cost and peak memory. `--device cpu --size tiny` runs the same code anywhere.
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.longlive2.generator import ShotGenerator
from engine.longlive2.model import PRESETS, at_size, build_random, init_random_, quantize_fp8
from engine.longlive2.vae import PRESETS as VAE_PRESETS
from engine.longlive2.vae import StreamingDecoder22, Wan22ImageEncoder, Wan22VAEDecoder


def _timed(device: torch.device, fn):
    """(fn(), seconds), synchronised on CUDA (kept here: engine/gpu_check.py is being reworked on main)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def pipeline(size: str, width: int, height: int, blocks: int, device: torch.device, dtype: torch.dtype,
             fp8: bool) -> list[str]:
    """Run the blocks with three switches; return report lines."""
    cfg = at_size(PRESETS[size], width, height)
    model = build_random(cfg, device, dtype)
    if fp8:
        model = quantize_fp8(model)
    vae_cfg = VAE_PRESETS["wan2.2" if size == "5b" else "tiny"]
    with torch.device("meta"):
        decoder, encoder = Wan22VAEDecoder(vae_cfg), Wan22ImageEncoder(vae_cfg)
    for module in (decoder, encoder):
        module.to_empty(device=device).to(dtype)
        init_random_(module)
    stream = StreamingDecoder22(decoder.eval())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8)
    start_latent, encode_s = _timed(device, lambda: encoder.eval()(image))
    gen = ShotGenerator(model)
    prompt = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)
    gen.start(prompt, seed=0, image_latent=start_latent)
    switches = {blocks // 4: dict(cut=False), blocks // 2: dict(cut=True),
                3 * blocks // 4: dict(mode="recache")}
    dit_s = vae_s = recache_s = 0.0
    frames = 0
    with torch.no_grad():
        for b in range(blocks):
            if b in switches:
                gen.switch_prompt(prompt.roll(b, 1), **switches[b])
            recaches = gen.recaches
            latents, t = _timed(device, gen.next_block)
            if gen.recaches > recaches:
                recache_s = t  # the block that carried the recache (block + recache)
            pixels, tv = _timed(device, lambda latents=latents: stream.decode_block(latents))
            if b:  # the first block pays for allocation and autotuning
                dit_s, vae_s, frames = dit_s + t, vae_s + tv, frames + pixels.shape[0]
    steady = max(1, blocks - 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"longlive2 {size} {width}x{height} ({cfg.frame_seq_length} tokens/frame) on {device} ({name}), "
        f"{dtype}, fp8={fp8}; {blocks} blocks: switch at {blocks // 4}, shot cut at {blocks // 2}, "
        f"recache at {3 * blocks // 4}; I2V start",
        f"DiT only: {dit_s / steady * 1000:.1f} ms/block -> {frames / max(dit_s, 1e-9):.2f} FPS",
        f"DiT + VAE: {(dit_s + vae_s) / steady * 1000:.1f} ms/block -> "
        f"{frames / max(dit_s + vae_s, 1e-9):.2f} FPS "
        f"(VAE {vae_s / steady * 1000:.1f} ms/block)",
        f"block with recache: {recache_s * 1000:.1f} ms; image encode: {encode_s * 1000:.1f} ms",
    ]
    if device.type == "cuda":
        lines.append(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(PRESETS), default="5b")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    parser.add_argument("--fp8", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run on a GPU host, or pass --device cpu --size tiny for a smoke run")
        return 1
    cfg = PRESETS[args.size]
    width, height = args.width or cfg.latent_width * 16, args.height or cfg.latent_height * 16
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda"
                                                                          else "fp32")]
    for line in pipeline(args.size, width, height, args.blocks, device, dtype, args.fp8):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
