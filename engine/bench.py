"""`promptcast bench engine`: DiT block loop speed with random weights (real timings, no download)."""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch._dynamo.utils import counters

from engine.attention import attention_backend
from engine.generator import StreamConfig, StreamingGenerator
from engine.model import PRESETS, parameter_count
from engine.random_weights import random_dit, random_vae_decoder
from engine.sampler import SamplerConfig
from engine.vae import PRESETS as VAE_PRESETS
from engine.vae import StreamingDecoder

REFERENCE_FPS_H100 = 20.7  # LongLive 1.0 README, bf16 (scope of the figure not stated)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(dev: torch.device, fn) -> tuple[object, float]:
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return out, time.perf_counter() - t0


def _run(model, cfg, dev: torch.device, chosen: tuple[int, ...], blocks: int, compile_mode: str | None,
         decoder: StreamingDecoder | None) -> dict:
    """Time `blocks` blocks (DiT, then VAE decode) and one recache for one way of running the step."""
    gen = StreamingGenerator(model, SamplerConfig(denoising_steps=chosen), StreamConfig(rope_mode="relative"),
                             compile_mode=compile_mode)
    prompt = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev)
    gen.start(prompt, seed=0)
    if decoder is not None:
        decoder.reset()
    dit, vae = [], []
    for _ in range(blocks):
        latents, seconds = _timed(dev, gen.next_block)
        dit.append(seconds)
        if decoder is not None:
            vae.append(_timed(dev, lambda latents=latents: decoder.decode_block(latents))[1])
        else:
            vae.append(0.0)
    _, recache_s = _timed(dev, lambda: gen.recache(torch.randn_like(prompt)))
    steady = slice(min(4, blocks - 1), None)  # once the window is full (4 blocks of 3 in 12 frames)
    return {"dit": dit, "vae": vae, "recache_ms": recache_s * 1000, "frame": gen.frame,
            "steady_ms": 1000 * sum(dit[steady]) / len(dit[steady]),
            "steady_vae_ms": 1000 * sum(vae[steady]) / len(vae[steady]),
            "first_from": steady.start + 1, "steady_passes": gen.steady_passes}


def bench_engine(size: str = "tiny", blocks: int = 8, steps: int = 4, dtype: str = "fp32",
                 compile_model: bool = False, device: str | None = None, width: int | None = None,
                 height: int | None = None, vae: bool | None = None) -> str:
    """Time blocks and a recache; report ms/block (DiT, VAE), FPS and peak memory; with `compile_model`
    eager and compiled in the same run, with the compile time, graph breaks and recompiles.

    `width`/`height` (pixels, multiples of 16) run the preset's architecture at another frame
    size, e.g. the full 1.3B model at 64x64 on a CPU. `vae` (default: on, except for the full
    Wan VAE on a CPU, minutes per block there) adds the VAE decode to the timings.
    """
    cfg = PRESETS[size]
    if width is not None or height is not None:
        width, height = width or cfg.latent_width * 8, height or cfg.latent_height * 8
        if width % 16 or height % 16 or width <= 0 or height <= 0:
            raise ValueError(f"--width/--height must be positive multiples of 16, got {width}x{height}")
        cfg = cfg.with_latent_size(height // 8, width // 8)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    torch.manual_seed(0)
    model = random_dit(cfg, dev, torch_dtype)  # built in its dtype: no fp32 copy of 5.7 GB
    vae_cfg = VAE_PRESETS["wan2.1" if size == "1.3b" else "tiny"]
    if vae is None:
        vae = dev.type == "cuda" or size != "1.3b"
    decoder = StreamingDecoder(random_vae_decoder(vae_cfg, dev, torch_dtype)) if vae else None
    all_steps = (1000, 750, 500, 250)
    chosen = all_steps[:: max(1, len(all_steps) // steps)][:steps] if steps <= 4 else all_steps
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    eager = _run(model, cfg, dev, chosen, blocks, None, decoder)
    compiled = None
    if compile_model:
        torch._dynamo.reset()
        counters.clear()
        mode = "reduce-overhead" if dev.type == "cuda" else "default"
        compiled = _run(model, cfg, dev, chosen, blocks, mode, decoder)
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    if dev.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB (CUDA allocated)"
        gpu = torch.cuda.get_device_name(dev)
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"
        gpu = "cpu"
    best = compiled or eager
    fps_steady = 12 / (best["steady_ms"] / 1000)
    fps_vae = 12 / ((best["steady_ms"] + best["steady_vae_ms"]) / 1000)
    lines = [
        f"bench engine: size {size} ({parameter_count(cfg) / 1e6:.1f} M params), latent "
        f"{cfg.latent_height}x{cfg.latent_width} ({cfg.frame_seq_length} tokens/frame), {dtype}, "
        f"steps {list(chosen)} + context pass, compile={compile_model}, "
        f"attention {attention_backend(dev, torch_dtype)}",
        f"device: {gpu}; torch {torch.__version__}",
        f"blocks: {blocks}; eager: first block {eager['dit'][0] * 1000:.1f} ms, steady block "
        f"{eager['steady_ms']:.1f} ms (blocks {eager['first_from']}..{blocks})",
    ]
    if compiled is not None:
        # The step compiles inside the block that first fills the window: the largest excess.
        compile_s = max(c - e for c, e in zip(compiled["dit"], eager["dit"], strict=True))
        lines += [
            f"compiled: steady block {compiled['steady_ms']:.1f} ms; eager/compiled ratio "
            f"{eager['steady_ms'] / compiled['steady_ms']:.2f} ({compiled['steady_passes']} passes compiled)",
            f"compile time (the block that compiled, minus its eager time): {compile_s:.1f} s",
            f"graph breaks: {breaks}",
            f"recompiles after warm-up: {max(0, graphs - 1)} ({graphs} graph compiled)",
        ]
    vae_text = f"VAE decode {best['steady_vae_ms']:.1f} ms" if vae else "VAE decode not run (--vae runs it)"
    lines += [
        f"time per steady block: DiT {best['steady_ms']:.1f} ms + {vae_text}; "
        f"recache (window of {min(cfg.local_attn_size, best['frame'])} frames) {best['recache_ms']:.1f} ms",
        f"FPS (pixel frames, 12 per block): DiT only {fps_steady:.2f}"
        + (f", with VAE decode {fps_vae:.2f}" if vae else "")
        + f" (reference LongLive 1.0: {REFERENCE_FPS_H100} FPS on H100 bf16)",
        f"peak memory: {peak}",
        "not included: text encoding (a prepared prompt costs none at the switch)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.bench`: the engine benchmark with PyTorch and engine/ alone (a bare GPU machine)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--steps", type=int, choices=[1, 2, 3, 4], default=4)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="also run the compiled steady step")
    parser.add_argument("--device", default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--vae", action=argparse.BooleanOptionalAction, default=None,
                        help="time the VAE decode too (default: yes, except the full VAE on a CPU)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    print(bench_engine(args.size, args.blocks, args.steps, args.dtype or ("bf16" if cuda else "fp32"),
                       args.compile, args.device, args.width, args.height, args.vae))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
