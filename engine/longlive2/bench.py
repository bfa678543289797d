"""`promptcast bench engine --model longlive2`: the 2.0 DiT block loop with random weights.

The same measurement and report as `engine.bench.bench_engine` (1.0): blocks timed one by one,
one recache, pixel-frame FPS and peak memory; here with the 2.0 presets, UniPC, 8-latent
blocks (29 then 32 pixel frames) and the model built directly in the compute dtype, so the 5B
model in bf16 fits a 16 GB host (no fp32 copy).
"""

from __future__ import annotations

import resource
import time

import torch

from engine.attention import attention_backend
from engine.longlive2.generator import ShotGenerator
from engine.longlive2.model import PRESETS, at_size, build_random
from engine.longlive2.unipc import UniPCConfig
from engine.model import parameter_count

REFERENCE_FPS = 24.8  # LongLive 2.0 README, LongLive-2.0-5B row, bf16 (hardware and method not stated)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_longlive2(size: str = "tiny", blocks: int = 8, steps: int = 4, dtype: str = "fp32",
                    compile_model: bool = False, device: str | None = None, width: int | None = None,
                    height: int | None = None) -> str:
    """Time `blocks` blocks and one recache of the 2.0 DiT; `width`/`height` in pixels (multiples of 32)."""
    if size not in PRESETS:
        raise ValueError(f"--size {size} is not a longlive2 preset (have: {', '.join(PRESETS)})")
    cfg = PRESETS[size]
    cfg = at_size(cfg, width or cfg.latent_width * 16, height or cfg.latent_height * 16)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = DTYPES[dtype]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    built = time.perf_counter()
    model = build_random(cfg, dev, torch_dtype)
    if compile_model:
        model = torch.compile(model)
    gen = ShotGenerator(model, UniPCConfig(steps=steps))
    build_s = time.perf_counter() - built
    prompt = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev)
    _sync(dev)
    t0 = time.perf_counter()
    gen.start(prompt, seed=0)  # embeds the prompt: every layer's 512-token text K/V
    _sync(dev)
    start_s = time.perf_counter() - t0
    times = []
    for _ in range(blocks):
        _sync(dev)
        t0 = time.perf_counter()
        gen.next_block()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    gen.recache()
    _sync(dev)
    recache_ms = (time.perf_counter() - t0) * 1000
    steady = times[4:] or times[1:] or times
    steady_ms = sum(steady) / len(steady) * 1000
    pixel_frames = 29 + 32 * (blocks - 1)  # what the Wan2.2 VAE makes of these latents
    if dev.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB (CUDA allocated)"
        name = torch.cuda.get_device_name(dev)
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"
        name = "cpu"
    recached = max(0, len(gen.slots) - cfg.sink_size // cfg.num_frame_per_block)
    return "\n".join([
        f"bench engine: longlive2 size {size} ({parameter_count(cfg) / 1e6:.1f} M params), latent "
        f"{cfg.latent_height}x{cfg.latent_width} ({cfg.frame_seq_length} tokens/frame), {dtype}, "
        f"UniPC {steps} steps t={gen.sampler.timesteps} + context pass, compile={compile_model}, "
        f"attention {attention_backend(dev, torch_dtype)}",
        f"device: {name}; torch {torch.__version__}; model built in {build_s:.1f} s, prompt embedded in "
        f"{start_s:.1f} s",
        f"blocks: {blocks}; first block {times[0] * 1000:.1f} ms; steady block {steady_ms:.1f} ms "
        f"(blocks {len(times) - len(steady) + 1}..{len(times)})",
        f"DiT-only FPS (pixel frames, 29 + 32/block): {pixel_frames / sum(times):.2f} over the run, "
        f"{32 / (steady_ms / 1000):.2f} steady (reference LongLive 2.0 README: {REFERENCE_FPS} FPS bf16, "
        f"hardware not stated)",
        f"recache ({recached} blocks beside the sink): {recache_ms:.1f} ms",
        f"peak memory: {peak}",
        "not included: VAE decode and text encoding (engine-core scope)",
    ])
