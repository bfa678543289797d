"""The `longlive` backend: UMT5 text encoding -> DiT block loop -> streaming VAE decode.

Runs inside the engine process. Frames are uint8 RGB [T, H, W, 3]: 9 for the first
block, 12 after. A prompt switch is a (usually pre-encoded) embedding plus a KV-recache
applied before the next block; a re-anchor renews the attention sink there (docs/engine.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from engine.checkpoints import config_from_wan_json, load_dit, read_checkpoint
from engine.generator import StreamConfig, StreamingGenerator
from engine.progress import LoadProgress, Report
from engine.sampler import SamplerConfig
from engine.settings import EngineSettings
from engine.text_encoder import TextEncoder, UMT5Config, default_encoder_dtype
from engine.vae import StreamingDecoder, VAEConfig, load_vae_decoder
from engine.weights import WeightPaths

log = logging.getLogger("engine.longlive")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def text_encoder_dtype(settings: EngineSettings, placement: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype UMT5 is loaded and run in (auto: the model dtype on the GPU, fp32 on the CPU)."""
    if settings.text_encoder_dtype != "auto":
        return DTYPES[settings.text_encoder_dtype]
    return default_encoder_dtype(placement, model_dtype)


def compile_mode(device: torch.device) -> str:
    """torch.compile mode of the steady step: CUDA graphs on a GPU, plain Inductor on a CPU."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def resolve_device(settings: EngineSettings) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype the settings ask for (auto: CUDA bf16, else CPU fp32)."""
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    if settings.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, DTYPES[settings.dtype]


class LongLiveEngine:
    """LongLive 1.0 behind the engine interface (product.md)."""

    def __init__(self, settings: EngineSettings, report: Report | None = None,
                 heartbeat: Callable[[], None] | None = None):
        """Load every weight file; `report` receives load progress, `heartbeat` is called per layer."""
        started = time.perf_counter()
        self.settings = settings
        self.width, self.height, self.fps = settings.width, settings.height, settings.fps
        self.device, self.dtype = resolve_device(settings)
        paths = WeightPaths(settings.weights_dir)
        rate = settings.load_max_mb_s * 1e6 if settings.load_max_mb_s else None
        progress = LoadProgress([paths.base, paths.lora, paths.text_encoder, paths.vae], report,
                                max_bytes_per_s=rate)
        cfg = config_from_wan_json(paths.dit_config, settings.height // 8, settings.width // 8)
        model = load_dit(cfg, paths.base, paths.lora, merge_lora=settings.merge_lora, device=self.device,
                         dtype=self.dtype, progress=progress)
        self.generator = StreamingGenerator(
            model, SamplerConfig(denoising_steps=tuple(settings.steps)),
            StreamConfig(global_sink=settings.global_sink, rope_mode=settings.rope_mode,
                         drift_threshold=settings.reanchor_drift_threshold,
                         reanchor_every_blocks=settings.reanchor_every_blocks),
            on_layer=heartbeat, compile_mode=compile_mode(self.device) if settings.compile else None)
        t5_state = read_checkpoint(paths.text_encoder)  # memory-mapped: only the shapes are read
        t5_cfg = UMT5Config.from_state_dict(t5_state, text_len=cfg.text_len)
        del t5_state
        if t5_cfg.dim != cfg.text_dim:
            raise ValueError(f"{paths.text_encoder}: encoder width {t5_cfg.dim} "
                             f"!= DiT text_dim {cfg.text_dim}")
        placement = settings.text_encoder_device
        self.text = TextEncoder.from_files(
            paths.text_encoder, paths.tokenizer, t5_cfg, device=self.device, dtype=self.dtype,
            placement=placement,
            encoder_dtype=text_encoder_dtype(settings, placement, self.dtype), progress=progress,
            on_layer=heartbeat)
        vae_cfg = VAEConfig.from_state_dict(read_checkpoint(paths.vae))
        vae = load_vae_decoder(paths.vae, vae_cfg, device=self.device, dtype=self.dtype, progress=progress)
        self.decoder = StreamingDecoder(vae, on_layer=heartbeat)
        self.load_seconds = time.perf_counter() - started
        log.info("longlive loaded %.1f GB in %.1fs on %s (%s; text encoder on %s in %s): DiT %dx%d latents, "
                 "%d steps, rope %s, global_sink %s", progress.total_bytes / 1e9, self.load_seconds,
                 self.device,
                 self.dtype, placement, self.text.encoder.token_embedding.weight.dtype, cfg.latent_height,
                 cfg.latent_width, len(settings.steps), settings.rope_mode, settings.global_sink)

    @property
    def recaches(self) -> int:
        """KV-recaches run so far (one per prompt switch after the first block, unless re-anchored)."""
        return self.generator.recaches

    @property
    def reanchors(self) -> int:
        """Soft re-anchors run so far (requested, periodic or drift-triggered)."""
        return self.generator.reanchors

    @property
    def drift(self) -> float:
        """The generator's last drift score (0 while it captures its reference)."""
        return self.generator.drift

    def prepare_prompt(self, prompt: str) -> None:
        """Encode a prompt ahead of time, so switching to it costs only the recache."""
        self.text.prepare(prompt)

    def start(self, prompt: str, seed: int) -> None:
        """Begin a stream."""
        self.decoder.reset()
        self.generator.start(self.text.encode(prompt), seed)

    def switch_prompt(self, prompt: str) -> None:
        """Follow `prompt` from the next block (KV-recache then)."""
        self.generator.switch_prompt(self.text.encode(prompt))

    def reanchor(self) -> None:
        """Soft re-anchor before the next block; with a switch pending there, one pass set does both."""
        self.generator.request_reanchor()

    @torch.no_grad()
    def next_block(self) -> np.ndarray:
        """Generate and decode one block: uint8 [T, H, W, 3]."""
        latents = self.generator.next_block()
        frames = self.decoder.decode_block(latents)
        return frames.cpu().numpy()

    def reset(self) -> None:
        """Forget the stream."""
        self.generator.reset()
        self.decoder.reset()
