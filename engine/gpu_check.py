"""Full-pipeline check for a CUDA host: speed, recache cost, memory, and CUDA-vs-CPU agreement.

    scripts/gpu_check.sh [--blocks 24] [--compile]

Builds the pipeline with random weights (no download needed): DiT 1.3B + streaming VAE
(+ the UMT5-XXL encoder unless --no-text-encoder), runs N blocks with a prompt switch in
the middle, prints DiT-only and DiT+VAE FPS, the recache cost and peak memory, then runs
the tiny golden preset on CUDA and on the CPU and reports the largest difference.
`--device cpu --size tiny` runs the same code on any machine (the test suite does).
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.generator import StreamConfig, StreamingGenerator
from engine.model import PRESETS, CausalWanModel
from engine.sampler import SamplerConfig
from engine.text_encoder import PRESETS as T5_PRESETS
from engine.text_encoder import UMT5Encoder
from engine.vae import PRESETS as VAE_PRESETS
from engine.vae import StreamingDecoder, WanVAEDecoder


def _timed(device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def pipeline_speed(size: str, blocks: int, device: torch.device, dtype: torch.dtype, compile_model: bool,
                   text_encoder: bool) -> list[str]:
    """Run `blocks` blocks with a switch halfway; return report lines."""
    cfg = PRESETS[size]
    torch.manual_seed(0)
    with device:
        model = CausalWanModel(cfg).to(dtype).eval().requires_grad_(False)
        decoder = StreamingDecoder(WanVAEDecoder(VAE_PRESETS["wan2.1" if size == "1.3b" else "tiny"])
                                   .to(dtype).eval().requires_grad_(False))
        t5 = None
        if text_encoder:
            t5_cfg = T5_PRESETS["umt5-xxl" if size == "1.3b" else "tiny"]
            t5 = UMT5Encoder(t5_cfg).to(dtype).eval().requires_grad_(False)
    if compile_model:
        model = torch.compile(model)
    gen = StreamingGenerator(model, SamplerConfig(), StreamConfig(rope_mode="relative"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ids = torch.randint(0, 1000 if size == "1.3b" else 80, (1, cfg.text_len), device=device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if t5 is not None:
            prompt, encode_s = _timed(device, lambda: t5(ids, mask))
        else:
            prompt, encode_s = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype), 0.0
        gen.start(prompt, seed=0)
        dit_s = vae_s = 0.0
        frames = 0
        recache_s = 0.0
        for b in range(blocks):
            if b == blocks // 2:
                gen.switch_prompt(prompt.flip(1))
                _, recache_s = _timed(device, lambda: gen.recache(gen._pending_prompt))
                gen._pending_prompt = None
            latents, t = _timed(device, gen.next_block)
            dit_s += t if b else 0.0
            pixels, t = _timed(device, lambda latents=latents: decoder.decode_block(latents))
            vae_s += t if b else 0.0
            frames += pixels.shape[0] if b else 0
    steady = max(1, blocks - 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"pipeline {size} on {device} ({name}), {dtype}, compile={compile_model}; "
        f"{blocks} blocks, switch at block {blocks // 2}",
        f"DiT only: {dit_s / steady * 1000:.1f} ms/block -> {frames / dit_s:.2f} FPS",
        f"DiT + VAE: {(dit_s + vae_s) / steady * 1000:.1f} ms/block -> {frames / (dit_s + vae_s):.2f} FPS "
        f"(VAE {vae_s / steady * 1000:.1f} ms/block)",
        f"recache: {recache_s * 1000:.1f} ms; text encode: {encode_s * 1000:.1f} ms",
    ]
    if device.type == "cuda":
        lines.append(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
                     f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved")
    return lines


def cuda_matches_cpu() -> str:
    """The tiny preset generated on CUDA and on the CPU (fp32, same weights and draws)."""
    def run(device: str) -> torch.Tensor:
        torch.manual_seed(0)
        model = CausalWanModel(PRESETS["tiny"]).to(device).eval().requires_grad_(False)
        gen = StreamingGenerator(model)
        torch.manual_seed(1)
        gen.start(torch.randn(1, 16, 32).to(device), seed=0)
        gen.noise.generator = torch.Generator("cpu").manual_seed(0)  # same draws on both devices
        gen.noise.device = "cpu"
        out = []
        for b in range(6):
            if b == 4:
                other = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2))
                gen.switch_prompt(other.to(device))
            out.append(gen.next_block().cpu())
        return torch.cat(out, 1)

    diff = (run("cuda") - run("cpu")).abs().max().item()
    verdict = "OK" if diff < 1e-3 else "MISMATCH"
    return f"CUDA vs CPU, tiny preset fp32, 6 blocks with a switch: max |diff| = {diff:.2e} ({verdict})"


def main(argv: list[str] | None = None) -> int:
    """Entry point of scripts/gpu_check.sh."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["1.3b", "tiny", "small"], default="1.3b")
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-text-encoder", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run on a GPU host, or pass --device cpu --size tiny for a smoke run")
        return 1
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda"
                                                                          else "fp32")]
    for line in pipeline_speed(args.size, args.blocks, device, dtype, args.compile, not args.no_text_encoder):
        print(line)
    if device.type == "cuda":
        print(cuda_matches_cpu())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
