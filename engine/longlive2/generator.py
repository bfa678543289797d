"""LongLive 2.0's block loop, live: UniPC per 8-frame block, shot sinks, and two kinds of prompt switch.

    gen = ShotGenerator(model)
    gen.start(prompt_embeds, seed=0)             # or image_latent=... to start from a picture
    latents = gen.next_block()                    # [1, 8, 48, h, w]
    gen.switch_prompt(embeds)                     # "prompt" mode: the next block's prompt, as 2.0
    gen.switch_prompt(embeds, cut=True)           # a shot cut: RoPE shot offset + pinned shot sink
    gen.switch_prompt(embeds, mode="recache")     # re-encode the window with the new prompt, as 1.0

See docs/engine-longlive2.md for what each switch does to the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from engine.cache import CrossCache
from engine.generator import NoiseSource
from engine.longlive2.cache import ShotKVCache
from engine.longlive2.model import ShotRope
from engine.longlive2.unipc import UniPC, UniPCConfig
from engine.model import CausalWanModel

SwitchMode = Literal["prompt", "recache"]
SCENE_CUT_PREFIX = "The scene transitions. "  # LongLive 2.0's shot-boundary marker (utils/dataset.py)


@dataclass(frozen=True)
class ShotStreamConfig:
    """How the stream uses its cache (the 2.0 inference defaults)."""

    switch_mode: SwitchMode = "prompt"
    multi_shot_sink: bool = True  # pin the first block of each shot
    rope_shot_offset: int = 8  # temporal RoPE offset added per shot cut (latent frames)
    batch: int = 1
    reanchor_every_blocks: int = 0  # re-anchor after this many blocks without one; 0 = never


@dataclass
class _Slot:
    """One block-sized region of the KV buffer: the clean latents written there and their RoPE frame."""

    latents: torch.Tensor
    rope_frame: int


class ShotGenerator:
    """Generates 8-frame latent blocks over a `ShotKVCache` (docs/engine-longlive2.md)."""

    def __init__(self, model: CausalWanModel, sampler: UniPCConfig | None = None,
                 stream: ShotStreamConfig | None = None,
                 noise_factory: Callable[[int], NoiseSource] | None = None,
                 on_layer: Callable[[], None] | None = None):
        """`on_layer` is called after every DiT layer of every pass (the engine's heartbeat)."""
        cfg = model.cfg
        for name in ("local_attn_size", "sink_size"):
            if getattr(cfg, name) % cfg.num_frame_per_block:
                raise ValueError(f"{name} ({getattr(cfg, name)}) must be a multiple of the block "
                                 f"({cfg.num_frame_per_block} frames)")
        self.model, self.cfg, self.on_layer = model, cfg, on_layer
        self.sampler = UniPC(sampler)
        self.stream = stream or ShotStreamConfig()
        param = model.patch_embedding.weight
        self.device, self.dtype = param.device, param.dtype
        batch = self.stream.batch
        self.kv = ShotKVCache(cfg.num_layers, batch, cfg.local_attn_size, cfg.sink_size, cfg.frame_seq_length,
                              cfg.num_heads, cfg.head_dim, self.dtype, self.device)
        self.text = CrossCache(cfg.num_layers, batch, cfg.text_len, cfg.num_heads, cfg.head_dim,
                               self.dtype, self.device)
        self.rope = ShotRope(cfg.head_dim, cfg.rope_max_frames, cfg.grid, self.device)
        self._noise_factory = noise_factory or (lambda seed: NoiseSource(seed, self.device, self.dtype))
        self.noise: NoiseSource | None = None
        self.slots: list[_Slot] = []  # mirrors the KV buffer, block by block
        self.image_latent: torch.Tensor | None = None
        self.frame = 0  # the next block's first latent frame
        self.shot = 0  # shot cuts so far (each adds rope_shot_offset to new positions)
        self._pending: tuple[torch.Tensor, bool, SwitchMode] | None = None
        self._pending_reanchor = False
        self._blocks_since_anchor = 0
        self.recaches = 0
        self.reanchors = 0
        self.shot_cuts = 0

    @property
    def started(self) -> bool:
        """True between `start` and `reset`."""
        return self.noise is not None

    @property
    def rope_offset(self) -> int:
        """The temporal RoPE offset of new frames (shots so far x the per-shot offset)."""
        return self.shot * self.stream.rope_shot_offset

    def start(self, prompt_embeds: torch.Tensor, seed: int, image_latent: torch.Tensor | None = None) -> None:
        """Begin a stream; `image_latent` [B, 1, C, h, w] becomes latent frame 0 at timestep 0 (I2V)."""
        self.reset()
        if image_latent is not None:
            cfg = self.cfg
            want = (self.stream.batch, 1, cfg.out_dim, cfg.latent_height, cfg.latent_width)
            if tuple(image_latent.shape) != want:
                raise ValueError(f"image latent {tuple(image_latent.shape)} != {want}")
            self.image_latent = image_latent.to(self.device, self.dtype)
        self.noise = self._noise_factory(seed)
        self.model.encode_text(prompt_embeds.to(self.device), self.text)

    def reset(self) -> None:
        """Forget the stream: cache, pin, shots, slots, frame counter."""
        self.kv.reset()
        self.text.valid = False
        self.slots = []
        self.image_latent = None
        self.frame = self.shot = 0
        self._pending = None
        self._pending_reanchor = False
        self._blocks_since_anchor = 0
        self.noise = None

    def switch_prompt(self, prompt_embeds: torch.Tensor, cut: bool = False,
                      mode: SwitchMode | None = None) -> None:
        """Follow a new prompt from the next block (the latest pending switch wins).

        `cut`: a shot boundary (the reference's "The scene transitions. " prefix): the new
        block gets the next shot's RoPE offset and is pinned as the shot sink; no recache.
        `mode` overrides the stream's switch mode for this switch.
        """
        self._pending = (prompt_embeds, cut, mode or self.stream.switch_mode)

    def request_reanchor(self) -> None:
        """Soft re-anchor before the next block: the window's clean frames become a fresh stream."""
        self._pending_reanchor = True

    def _forward(self, x: torch.Tensor, t: torch.Tensor, plan) -> torch.Tensor:
        """One DiT pass over x [B, F, C, H, W] at per-frame timesteps t [B, F]; flow in the same layout."""
        flow = self.model(x.permute(0, 2, 1, 3, 4), t, self.kv, plan, self.text, on_layer=self.on_layer)
        return flow.permute(0, 2, 1, 3, 4)

    def _pass(self, x: torch.Tensor, t: torch.Tensor, start_frame: int, rope_frame: int) -> torch.Tensor:
        fs = self.cfg.frame_seq_length
        plan = self.kv.shot_plan(start_frame * fs, x.shape[1] * fs, self.rope.angles(rope_frame, x.shape[1]))
        flow = self._forward(x, t, plan)
        self.kv.commit(plan)
        if plan.roll is not None:
            self._roll_slots(plan.roll_sink, plan.roll[0])
        return flow

    def _roll_slots(self, sink_tokens: int, evicted_tokens: int) -> None:
        """Drop the evicted blocks from the slot mirror, as the roll dropped them from the buffer."""
        bt = self.cfg.num_frame_per_block * self.cfg.frame_seq_length
        first = sink_tokens // bt
        del self.slots[first:first + evicted_tokens // bt]

    def _zeros_t(self, frames: int) -> torch.Tensor:
        return torch.zeros(self.stream.batch, frames, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def recache(self) -> None:
        """Re-encode every cached block after the global sink under the current prompt (block-causal, t=0).

        Each block keeps its buffer slots and its RoPE positions and sees the sink and the blocks
        before it in the buffer (as when it was generated, less what a roll has since evicted).
        The global sink keeps the first prompt (as 1.0 with global_sink: true).
        """
        cfg = self.cfg
        bt = cfg.num_frame_per_block * cfg.frame_seq_length
        first = cfg.sink_size // cfg.num_frame_per_block
        for j in range(first, len(self.slots)):
            slot = self.slots[j]
            frames = slot.latents.shape[1]
            plan = self.kv.rewrite_plan(j * bt, frames * cfg.frame_seq_length,
                                        self.rope.angles(slot.rope_frame, frames))
            self._forward(slot.latents, self._zeros_t(frames), plan)
        if len(self.slots) > first:
            self.recaches += 1

    @torch.no_grad()
    def reanchor(self) -> None:
        """Soft re-anchor: replay the cached blocks (in stream order) as a fresh stream from frame 0.

        The pin and the shot offset are dropped; the oldest replayed block becomes the global sink.
        """
        if not self.slots:
            return
        ordered = sorted(self.slots, key=lambda s: s.rope_frame)
        self.kv.reset()
        self.slots, self.frame, self.shot = [], 0, 0
        for slot in ordered:
            frames = slot.latents.shape[1]
            self._pass(slot.latents, self._zeros_t(frames), self.frame, self.frame)
            self.slots.append(_Slot(slot.latents, self.frame))
            self.frame += frames
        self.reanchors += 1
        self._blocks_since_anchor = 0

    def _apply_pending(self) -> bool:
        """Apply a pending switch / re-anchor before the block; True when this block starts a new shot."""
        if 0 < self.stream.reanchor_every_blocks <= self._blocks_since_anchor:
            self._pending_reanchor = True
        pending, self._pending = self._pending, None
        cut = False
        if pending is not None:
            embeds, cut, mode = pending
            self.model.encode_text(embeds.to(self.device), self.text)
            cut = cut and self.frame > 0
            if cut:
                self.shot += 1
                self.shot_cuts += 1
            elif mode == "recache" and not self._pending_reanchor:
                self.recache()
        if self._pending_reanchor:
            self._pending_reanchor = False
            self.reanchor()
        return cut

    @torch.no_grad()
    def next_block(self) -> torch.Tensor:
        """Denoise the next block: clean latents [B, 8, C, h, w]."""
        if self.noise is None:
            raise RuntimeError("start() the stream before asking for blocks")
        cut = self._apply_pending()
        cfg = self.cfg
        f0, frames = self.frame, cfg.num_frame_per_block
        rope_frame = f0 + self.rope_offset
        shape = (self.stream.batch, frames, cfg.out_dim, cfg.latent_height, cfg.latent_width)
        x = self.noise.block_noise(shape, f0).to(self.device, self.dtype)
        clamp = self.image_latent is not None and f0 == 0
        block = self.sampler.block()
        for i, timestep in enumerate(self.sampler.timesteps):
            t = self._zeros_t(frames).fill_(float(timestep))
            if clamp:  # I2V: frame 0 is the picture, clean (timestep 0), before and after every step
                x = torch.cat([self.image_latent, x[:, 1:]], dim=1)
                t[:, 0] = 0.0
            flow = self._pass(x, t, f0, rope_frame)
            x, _ = block.step(i, flow, x)
        if clamp:
            x = torch.cat([self.image_latent, x[:, 1:]], dim=1)
        # The clean context pass at t = 0: the block's slots now hold its clean keys.
        self._pass(x, self._zeros_t(frames), f0, rope_frame)
        self.slots.append(_Slot(x, rope_frame))
        if cut and self.stream.multi_shot_sink and cfg.sink_size > 0:
            self.kv.pin_last(frames, cfg.sink_size)
        self.frame += frames
        self._blocks_since_anchor += 1
        return x
