"""The `longlive2` backend: UMT5 -> Wan2.2-TI2V-5B DiT block loop (UniPC, shot sinks) -> streaming Wan2.2 VAE.

Runs inside the engine process like `engine.longlive.LongLiveEngine`, with the same interface,
so supervision, ring, metrics and control messages work unchanged. Frames are uint8 RGB
[T, H, W, 3]: 29 for the first 8-latent block, 32 after, at 24 fps. A switch is either the
reference's (the next block's prompt; a shot cut when it starts with "The scene transitions. ")
or a KV-recache (`engine.switch_mode`), see docs/engine-longlive2.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from engine.checkpoints import load_dit, read_checkpoint
from engine.longlive import LongLiveEngine, resolve_device, text_encoder_dtype
from engine.longlive2.generator import SCENE_CUT_PREFIX, ShotGenerator, ShotStreamConfig
from engine.longlive2.model import config_from_ti2v_json, fp8_blocker, quantize_fp8, upcast_cpu_linears_
from engine.longlive2.unipc import UniPCConfig
from engine.longlive2.vae import StreamingDecoder22, load_vae22
from engine.model import ModelConfig
from engine.progress import LoadProgress, Report
from engine.settings import EngineSettings
from engine.text_encoder import TextEncoder, UMT5Config
from engine.weights import WeightPaths2

log = logging.getLogger("engine.longlive2")


def read_start_image(path: Path, width: int, height: int) -> torch.Tensor:
    """A picture as uint8 RGB [height, width, 3], resized (bicubic) to the engine size."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(rgb).copy())


def load_text_encoder(settings: EngineSettings, paths: WeightPaths2, cfg: ModelConfig, device: torch.device,
                      dtype: torch.dtype, progress: LoadProgress) -> TextEncoder:
    """UMT5 + tokenizer from a weights directory, checked against the DiT's text width.

    (1.0's loader inlines the same steps; engine/longlive.py is being reworked on main.)
    """
    t5_state = read_checkpoint(paths.text_encoder)  # memory-mapped: only the shapes are read
    t5_cfg = UMT5Config.from_state_dict(t5_state, text_len=cfg.text_len)
    del t5_state
    if t5_cfg.dim != cfg.text_dim:
        raise ValueError(f"{paths.text_encoder}: encoder width {t5_cfg.dim} != DiT text_dim {cfg.text_dim}")
    placement = settings.text_encoder_device
    return TextEncoder.from_files(paths.text_encoder, paths.tokenizer, t5_cfg, device=device, dtype=dtype,
                                  placement=placement, progress=progress,
                                  encoder_dtype=text_encoder_dtype(settings, placement, dtype))


class LongLive2Engine(LongLiveEngine):
    """LongLive 2.0 behind the engine interface (product.md).

    Shares 1.0's delegation to generator/text encoder/decoder (recaches, reanchors, prepare_prompt,
    reanchor, next_block, reset); loading, start and switches are its own.
    """

    def __init__(self, settings: EngineSettings, report: Report | None = None,
                 heartbeat: Callable[[], None] | None = None):
        """Load every weight file; `report` receives load progress, `heartbeat` is called per layer."""
        started = time.perf_counter()
        self.settings = settings
        self.width, self.height, self.fps = settings.width, settings.height, settings.fps
        self.device, self.dtype = resolve_device(settings)
        if settings.fp8 and (blocker := fp8_blocker(self.device)):
            raise RuntimeError(f"engine.fp8: {blocker}")
        paths = WeightPaths2(settings.weights_dir)
        rate = settings.load_max_mb_s * 1e6 if settings.load_max_mb_s else None
        progress = LoadProgress([paths.base, paths.text_encoder, paths.vae], report, max_bytes_per_s=rate)
        cfg = config_from_ti2v_json(paths.dit_config, settings.width, settings.height)
        model = load_dit(cfg, paths.base, device=self.device, dtype=self.dtype, progress=progress)
        if settings.fp8:
            model = quantize_fp8(model)
        upcast_cpu_linears_(model)  # CPU bf16 without AVX-512: fp32 products (a no-op on CUDA)
        if settings.compile:
            model = torch.compile(model)
        self.generator = ShotGenerator(
            model, UniPCConfig(steps=settings.sampling_steps),
            ShotStreamConfig(switch_mode=settings.switch_mode,
                             reanchor_every_blocks=settings.reanchor_every_blocks),
            on_layer=None if settings.compile else heartbeat)  # a callback inside a compiled graph breaks it
        self.text = load_text_encoder(settings, paths, cfg, self.device, self.dtype, progress)
        decoder, self.image_encoder = load_vae22(paths.vae, device=self.device, dtype=self.dtype,
                                                 progress=progress)
        self.decoder = StreamingDecoder22(decoder)
        self.start_latent = None
        if settings.start_image is not None:
            image = read_start_image(settings.start_image, settings.width, settings.height)
            self.start_latent = self.image_encoder(image)
        self.load_seconds = time.perf_counter() - started
        log.info("longlive2 loaded %.1f GB in %.1fs on %s (%s): latent %dx%d (%d tokens/frame), "
                 "UniPC %d steps, switch %s, start image %s", progress.total_bytes / 1e9, self.load_seconds,
                 self.device, self.dtype, cfg.latent_height, cfg.latent_width, cfg.frame_seq_length,
                 settings.sampling_steps, settings.switch_mode, settings.start_image)

    @property
    def shot_cuts(self) -> int:
        """Shot cuts so far (prompts that began with the scene-transition prefix)."""
        return self.generator.shot_cuts

    @property
    def drift(self) -> float:
        """No drift score for 2.0 (drift-triggered re-anchors are refused in its settings)."""
        return 0.0

    def start(self, prompt: str, seed: int) -> None:
        """Begin a stream (from `engine.start_image` when set: its latent is frame 0 at timestep 0)."""
        self.decoder.reset()
        self.generator.start(self.text.encode(prompt), seed, image_latent=self.start_latent)

    def switch_prompt(self, prompt: str) -> None:
        """Follow `prompt` from the next block: a shot cut if it starts with the scene-transition prefix.

        Otherwise `engine.switch_mode` decides: the next block's prompt only, or a KV-recache too.
        """
        self.generator.switch_prompt(self.text.encode(prompt), cut=prompt.startswith(SCENE_CUT_PREFIX))
