"""`promptcast bench engine`: DiT block loop speed with random weights (real timings, no download)."""

from __future__ import annotations

import resource
import time

import torch

from engine.attention import attention_backend
from engine.generator import StreamingGenerator
from engine.model import PRESETS, CausalWanModel, parameter_count
from engine.sampler import SamplerConfig

REFERENCE_FPS_H100 = 20.7  # LongLive 1.0 README, bf16 (scope of the figure not stated)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_engine(size: str = "tiny", blocks: int = 8, steps: int = 4, dtype: str = "fp32",
                 compile_model: bool = False, device: str | None = None, width: int | None = None,
                 height: int | None = None) -> str:
    """Time `blocks` blocks and one recache; report ms/block, pixel-frame FPS and peak memory.

    `width`/`height` (pixels, multiples of 16) run the preset's architecture at another frame
    size, e.g. the full 1.3B model at 64x64 on a CPU.
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
    with dev:
        model = CausalWanModel(cfg).cast(torch_dtype).eval().requires_grad_(False)
    if compile_model:
        model = torch.compile(model)
    all_steps = (1000, 750, 500, 250)
    chosen = all_steps[:: max(1, len(all_steps) // steps)][:steps] if steps <= 4 else all_steps
    gen = StreamingGenerator(model, SamplerConfig(denoising_steps=chosen))
    prompt = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    gen.start(prompt, seed=0)
    times = []
    for _ in range(blocks):
        _sync(dev)
        t0 = time.perf_counter()
        gen.next_block()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    _sync(dev)
    t0 = time.perf_counter()
    gen.recache(torch.randn_like(prompt))
    _sync(dev)
    recache_ms = (time.perf_counter() - t0) * 1000
    steady = times[4:] or times[1:] or times
    steady_ms = sum(steady) / len(steady) * 1000
    pixel_frames = 9 + 12 * (blocks - 1)  # what the Wan VAE makes of these latents
    fps_all = pixel_frames / sum(times)
    fps_steady = 12 / (steady_ms / 1000)
    if dev.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB (CUDA allocated)"
        gpu = torch.cuda.get_device_name(dev)
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"
        gpu = "cpu"
    lines = [
        f"bench engine: size {size} ({parameter_count(cfg) / 1e6:.1f} M params), latent "
        f"{cfg.latent_height}x{cfg.latent_width} ({cfg.frame_seq_length} tokens/frame), {dtype}, "
        f"steps {list(chosen)} + context pass, compile={compile_model}, "
        f"attention {attention_backend(dev, torch_dtype)}",
        f"device: {gpu}; torch {torch.__version__}",
        f"blocks: {blocks}; first block {times[0] * 1000:.1f} ms; steady block {steady_ms:.1f} ms "
        f"(blocks {len(times) - len(steady) + 1}..{len(times)})",
        f"DiT-only FPS (pixel frames, 9 + 12/block): {fps_all:.2f} over the run, {fps_steady:.2f} steady "
        f"(reference LongLive 1.0: {REFERENCE_FPS_H100} FPS on H100 bf16)",
        f"recache (window of {min(cfg.local_attn_size, gen.frame)} frames): {recache_ms:.1f} ms",
        f"peak memory: {peak}",
        "not included: VAE decode and text encoding (engine-core scope)",
    ]
    return "\n".join(lines)
