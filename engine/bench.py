"""`promptcast bench engine`: DiT block loop speed with random weights (real timings, no download)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import attention_backend
from engine.generator import StreamingGenerator
from engine.longlive2.generator import ShotGenerator
from engine.longlive2.model import PRESETS as LL2_PRESETS
from engine.longlive2.model import build_random
from engine.longlive2.unipc import UniPCConfig
from engine.model import PRESETS, CausalWanModel, ModelConfig, parameter_count
from engine.sampler import SamplerConfig

REFERENCE_FPS_H100 = 20.7  # LongLive 1.0 README, bf16 (scope of the figure not stated)
REFERENCE_FPS_LL2 = 24.8  # LongLive 2.0 README, LongLive-2.0-5B row (hardware and method not stated)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Setup:
    """What the timing loop needs from one model family."""

    gen: object  # StreamingGenerator or ShotGenerator: start / next_block / frame
    cfg: ModelConfig
    prompt: torch.Tensor
    recache: Callable[[], None]
    schedule: str  # the steps line
    first_frames: int  # pixel frames the VAE makes of the first block
    block_frames: int  # ... and of every later block
    reference: str


def _longlive(cfg: ModelConfig, steps: int, torch_dtype: torch.dtype, compile_model: bool,
              dev: torch.device) -> _Setup:
    torch.manual_seed(0)
    with dev:
        model = CausalWanModel(cfg).cast(torch_dtype).eval().requires_grad_(False)
    if compile_model:
        model = torch.compile(model)
    all_steps = (1000, 750, 500, 250)
    chosen = all_steps[:: max(1, len(all_steps) // steps)][:steps] if steps <= 4 else all_steps
    gen = StreamingGenerator(model, SamplerConfig(denoising_steps=chosen))
    prompt = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev)
    return _Setup(gen, cfg, prompt, lambda: gen.recache(torch.randn_like(prompt)),
                  f"steps {list(chosen)} + context pass", 9, 12,
                  f"reference LongLive 1.0: {REFERENCE_FPS_H100} FPS on H100 bf16")


def _longlive2(cfg: ModelConfig, steps: int, torch_dtype: torch.dtype, compile_model: bool,
               dev: torch.device) -> _Setup:
    # Allocated once, in the compute dtype: the 5B model in bf16 is 10 GB, never an fp32 copy.
    model = build_random(cfg, dev, torch_dtype)
    if compile_model:
        model = torch.compile(model)
    gen = ShotGenerator(model, UniPCConfig(steps=steps))
    prompt = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev)
    return _Setup(gen, cfg, prompt, gen.recache,
                  f"UniPC {steps} steps t={gen.sampler.timesteps} + context pass", 29, 32,
                  f"reference LongLive 2.0 README: {REFERENCE_FPS_LL2} FPS bf16 (hardware not stated)")


def bench_engine(size: str = "tiny", blocks: int = 8, steps: int = 4, dtype: str = "fp32",
                 compile_model: bool = False, device: str | None = None, width: int | None = None,
                 height: int | None = None, model: str = "longlive") -> str:
    """Time `blocks` blocks and one recache; report ms/block, pixel-frame FPS and peak memory.

    `model`: longlive (1.0, Wan2.1 1.3B) or longlive2 (2.0, Wan2.2-TI2V-5B). `width`/`height`
    (pixels) run the preset's architecture at another frame size, e.g. the full 5B model at
    64x64 on a CPU.
    """
    presets, stride = (LL2_PRESETS, 16) if model == "longlive2" else (PRESETS, 8)
    if model not in ("longlive", "longlive2"):
        raise ValueError(f"unknown model {model!r} (longlive, longlive2)")
    if size not in presets:
        raise ValueError(f"--size {size} is not a {model} preset (have: {', '.join(presets)})")
    cfg = presets[size]
    if width is not None or height is not None:
        width, height = width or cfg.latent_width * stride, height or cfg.latent_height * stride
        if width % (2 * stride) or height % (2 * stride) or width <= 0 or height <= 0:
            raise ValueError(f"--width/--height must be positive multiples of {2 * stride}, "
                             f"got {width}x{height}")
        cfg = cfg.with_latent_size(height // stride, width // stride)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    setup = (_longlive2 if model == "longlive2" else _longlive)(cfg, steps, torch_dtype, compile_model, dev)
    gen, prompt = setup.gen, setup.prompt
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
    setup.recache()
    _sync(dev)
    recache_ms = (time.perf_counter() - t0) * 1000
    steady = times[4:] or times[1:] or times
    steady_ms = sum(steady) / len(steady) * 1000
    first, later = setup.first_frames, setup.block_frames
    pixel_frames = first + later * (blocks - 1)  # what the VAE makes of these latents
    fps_all = pixel_frames / sum(times)
    fps_steady = later / (steady_ms / 1000)
    if dev.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB (CUDA allocated)"
        gpu = torch.cuda.get_device_name(dev)
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"
        gpu = "cpu"
    lines = [
        f"bench engine: {model} size {size} ({parameter_count(cfg) / 1e6:.1f} M params), latent "
        f"{cfg.latent_height}x{cfg.latent_width} ({cfg.frame_seq_length} tokens/frame), {dtype}, "
        f"{setup.schedule}, compile={compile_model}, "
        f"attention {attention_backend(dev, torch_dtype)}",
        f"device: {gpu}; torch {torch.__version__}",
        f"blocks: {blocks}; first block {times[0] * 1000:.1f} ms; steady block {steady_ms:.1f} ms "
        f"(blocks {len(times) - len(steady) + 1}..{len(times)})",
        f"DiT-only FPS (pixel frames, {first} + {later}/block): {fps_all:.2f} over the run, "
        f"{fps_steady:.2f} steady ({setup.reference})",
        f"recache (window of {min(cfg.local_attn_size, gen.frame)} frames): {recache_ms:.1f} ms",
        f"peak memory: {peak}",
        "not included: VAE decode and text encoding (engine-core scope)",
    ]
    return "\n".join(lines)
