"""The streaming generator: LongLive's block loop with prompt switches by KV-recache (§4.3, §5).

    gen = StreamingGenerator(model, SamplerConfig())
    gen.start(prompt_embeds, seed=0)
    latents = gen.next_block()          # [1, 3, 16, h, w]
    gen.switch_prompt(other_embeds)     # applied before the next block
    gen.request_reanchor()              # soft re-anchor before the next block (docs/engine.md)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.cache import CrossCache, KVCache, RopeMode, SelfAttnPlan
from engine.model import CausalWanModel
from engine.sampler import FlowMatchSchedule, SamplerConfig


@dataclass(frozen=True)
class StreamConfig:
    """How the stream uses the cache."""

    global_sink: bool = True  # the reference's interactive default (LL1 commit 3e12502)
    rope_mode: RopeMode = "absolute"  # "relative" = the unbounded "infinity" variant (§3.5)
    batch: int = 1
    drift_threshold: float = 0.0  # re-anchor when the drift score passes this; 0 = never
    reanchor_every_blocks: int = 0  # re-anchor after this many blocks without one; 0 = never


# Drift score: blocks averaged into the reference after a start, switch or re-anchor, and the
# weight of the newest block in the smoothed statistic (one block of 3 frames is noisy).
DRIFT_ANCHOR_BLOCKS = 4
DRIFT_SMOOTHING = 0.5


class NoiseSource:
    """The random draws of a stream: block noise, then re-noise draws, in the reference's order."""

    def __init__(self, seed: int, device: torch.device | str, dtype: torch.dtype):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device, self.dtype = device, dtype

    def block_noise(self, shape: tuple[int, ...], start_frame: int) -> torch.Tensor:
        """Initial noise of the block starting at `start_frame`."""
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def renoise(self, shape: tuple[int, ...], start_frame: int, step: int) -> torch.Tensor:
        """The draw that re-noises x0 after denoising step `step` of the block."""
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)


class StreamingGenerator:
    """Generates latent blocks one at a time; prompt switches are KV-recaches at block boundaries."""

    def __init__(self, model: CausalWanModel, sampler: SamplerConfig | None = None,
                 stream: StreamConfig | None = None,
                 noise_factory: Callable[[int], NoiseSource] | None = None,
                 on_layer: Callable[[], None] | None = None, compile_mode: str | None = None):
        """`on_layer` is called after every DiT layer of every eager pass (the engine's heartbeat).

        `compile_mode` (e.g. "default" on a CPU, "reduce-overhead" for CUDA graphs) compiles the
        steady-state pass only (docs/engine.md, "Steady state"); warm-up blocks, recaches and
        re-anchors stay eager.
        """
        self.model = model
        self.on_layer = on_layer
        self.cfg = model.cfg
        self.sampler = sampler or SamplerConfig()
        self.stream = stream or StreamConfig()
        param = model.patch_embedding.weight  # the compute dtype (the fp32 islands aside)
        self.device, self.dtype = param.device, param.dtype
        self.schedule = FlowMatchSchedule(self.sampler.shift, self.sampler.num_train_timesteps)
        self.timesteps = [float(t) for t in
                          self.schedule.step_timesteps(self.sampler.denoising_steps, self.sampler.warp)]
        cfg = self.cfg
        self.kv = KVCache(cfg.num_layers, self.stream.batch, cfg.local_attn_size, cfg.sink_size,
                          cfg.frame_seq_length, cfg.num_heads, cfg.head_dim, self.dtype, self.device,
                          self.stream.rope_mode)
        self.text = CrossCache(cfg.num_layers, self.stream.batch, cfg.text_len, cfg.num_heads, cfg.head_dim,
                               self.dtype, self.device)
        # Clean latents of the last `local_attn_size` frames: what a recache re-encodes.
        self.history = torch.zeros(self.stream.batch, cfg.local_attn_size, cfg.out_dim, cfg.latent_height,
                                   cfg.latent_width, dtype=self.dtype, device=self.device)
        self._noise_factory = noise_factory or (lambda seed: NoiseSource(seed, self.device, self.dtype))
        self.noise: NoiseSource | None = None
        self.frame = 0  # the next block's first latent frame
        self._pending_prompt: torch.Tensor | None = None
        self._pending_reanchor = False
        self.recaches = 0
        self.reanchors = 0
        # Drift statistics: per-channel std of the clean latents, on the device (read without a sync).
        self._drift_ref = torch.zeros(cfg.out_dim, dtype=torch.float32, device=self.device)
        self._drift_now = torch.zeros_like(self._drift_ref)
        self._drift = torch.zeros((), dtype=torch.float32, device=self.device)
        self._anchor_blocks = 0  # blocks since the drift reference was last reset
        self._blocks_since_anchor = 0  # blocks since the start or the last re-anchor
        self.rope = model.rope()
        self.steady_passes = 0  # passes run by the compiled step
        self._step = None
        if compile_mode is not None:
            for buffer in (self.kv.k, self.kv.v, self.text.k, self.text.v):
                torch._dynamo.mark_static_address(buffer)  # CUDA graphs write these in place
            self._step = torch.compile(model, fullgraph=True, dynamic=False, mode=compile_mode)

    @property
    def started(self) -> bool:
        """True between `start` and `reset`."""
        return self.noise is not None

    def start(self, prompt_embeds: torch.Tensor, seed: int) -> None:
        """Begin a stream with this prompt embedding [B, text_len, text_dim]."""
        self.reset()
        self.noise = self._noise_factory(seed)
        self._set_prompt(prompt_embeds)

    def reset(self) -> None:
        """Forget the stream: caches, pointers, history, frame counter."""
        self.kv.reset()
        self.text.valid = False
        self.history.zero_()
        self.frame = 0
        self._pending_prompt = None
        self._pending_reanchor = False
        self._blocks_since_anchor = 0
        self._reset_drift()
        self.noise = None

    def switch_prompt(self, prompt_embeds: torch.Tensor) -> None:
        """Follow a new prompt from the next block on (only the latest pending switch counts)."""
        self._pending_prompt = prompt_embeds

    def request_reanchor(self) -> None:
        """Soft re-anchor before the next block (with the pending prompt, if a switch is pending too)."""
        self._pending_reanchor = True

    @property
    def drift(self) -> float:
        """The last drift score: mean |log(std / reference std)| over latent channels (0 while anchoring)."""
        return float(self._drift)

    def _set_prompt(self, prompt_embeds: torch.Tensor) -> None:
        self.model.encode_text(prompt_embeds.to(self.device), self.text, on_layer=self.on_layer)

    def _forward(self, x: torch.Tensor, timestep: float, start_frame: int,
                 sink_recache: bool = False) -> torch.Tensor:
        """One DiT pass over latents x [B, F, C, H, W]; returns the flow prediction in the same layout."""
        frames = x.shape[1]
        fs = self.cfg.frame_seq_length
        plan, pointers = self.kv.plan(start_frame * fs, frames * fs, self.rope, sink_recache=sink_recache)
        t = torch.full((x.shape[0], frames), timestep, dtype=torch.float32, device=self.device)
        x = x.permute(0, 2, 1, 3, 4).contiguous()  # one layout every pass: compiled steps guard strides
        if self._step is not None and self._is_steady(plan, frames):
            self.steady_passes += 1
            flow = self._step(x, t, self.kv, plan, self.text)  # compiled: no per-layer callback inside
            if self.on_layer is not None:
                self.on_layer()
        else:
            flow = self.model(x, t, self.kv, plan, self.text, on_layer=self.on_layer)
        self.kv.commit(pointers)
        return flow.permute(0, 2, 1, 3, 4)

    def _is_steady(self, plan: SelfAttnPlan, frames: int) -> bool:
        """A pass with the steady shapes: one block written by index, the full window read."""
        return (frames == self.cfg.num_frame_per_block and plan.read_len == self.kv.capacity
                and plan.skip == 0 and plan.mask is None)

    def recache(self, prompt_embeds: torch.Tensor) -> None:
        """KV-recache (§5.2): re-encode the last min(window, frames) clean frames under the new prompt."""
        if not self.stream.global_sink:
            self.kv.zero_()
        self._set_prompt(prompt_embeds)
        if self.frame == 0:
            return
        n = min(self.cfg.local_attn_size, self.frame)
        start = self.frame - n
        frames = self.history[:, self.cfg.local_attn_size - n:]
        self._forward(frames, self.sampler.context_noise, start, sink_recache=not self.stream.global_sink)
        self.recaches += 1
        self._reset_drift()  # a new prompt may legitimately look different: that is not drift

    @torch.no_grad()
    def reanchor(self, prompt_embeds: torch.Tensor | None = None) -> None:
        """Soft re-anchor: re-encode the recent clean frames as a fresh stream, so they become the sink.

        Unlike a reset there is no cut: the history is kept and the next block attends to the same
        recent frames, now at positions 0..n. Passes go block by block as in generation (a single
        pass of the whole window would not fit beside the sink). With `prompt_embeds` it also
        applies a prompt switch, replacing that switch's recache.
        """
        if prompt_embeds is not None:
            self._set_prompt(prompt_embeds)
        if self.frame == 0:
            return  # nothing generated yet: the stream is as fresh as it gets
        cfg = self.cfg
        n = min(cfg.local_attn_size, self.frame)
        frames = self.history[:, cfg.local_attn_size - n:]
        self.kv.reset()
        for start in range(0, n, cfg.num_frame_per_block):
            self._forward(frames[:, start:start + cfg.num_frame_per_block], self.sampler.context_noise, start)
        self.frame = n
        self.reanchors += 1
        self._blocks_since_anchor = 0
        self._reset_drift()

    def _reset_drift(self) -> None:
        self._anchor_blocks = 0
        self._drift_ref.zero_()
        self._drift.zero_()

    def _track_drift(self, x0: torch.Tensor) -> None:
        """Update the drift score from this block's clean latents (device ops only: no sync here)."""
        # Contrast/saturation creep shows up as a growing spread of the latents.
        std = x0.float().std(dim=(0, 1, 3, 4)).clamp_min(1e-6)
        self._anchor_blocks += 1
        self._blocks_since_anchor += 1
        if self._anchor_blocks <= DRIFT_ANCHOR_BLOCKS:
            self._drift_ref += std / DRIFT_ANCHOR_BLOCKS
            self._drift_now.copy_(self._drift_ref)
            return
        self._drift_now.lerp_(std, DRIFT_SMOOTHING)
        self._drift.copy_((self._drift_now / self._drift_ref).log().abs().mean())

    def _schedule_reanchor(self) -> None:
        """Request a re-anchor when the drift score or the periodic schedule asks for one."""
        stream = self.stream
        # Read here, not at the end of the last block: by now the caller has consumed that block,
        # so the score's sync costs nothing.
        if stream.drift_threshold > 0 and self.drift > stream.drift_threshold:
            self._pending_reanchor = True
        if 0 < stream.reanchor_every_blocks <= self._blocks_since_anchor:
            self._pending_reanchor = True

    @torch.no_grad()
    def next_block(self) -> torch.Tensor:
        """Denoise the next block: clean latents [B, block frames, C, h, w]."""
        if self.noise is None:
            raise RuntimeError("start() the stream before asking for blocks")
        self._schedule_reanchor()
        prompt, self._pending_prompt = self._pending_prompt, None
        if self._pending_reanchor:
            self._pending_reanchor = False
            self.reanchor(prompt)  # one set of passes for both
        elif prompt is not None:
            self.recache(prompt)
        cfg = self.cfg
        f0, frames = self.frame, cfg.num_frame_per_block
        shape = (self.stream.batch, frames, cfg.out_dim, cfg.latent_height, cfg.latent_width)
        x = self.noise.block_noise(shape, f0).to(self.device, self.dtype)
        steps = self.timesteps
        for k, timestep in enumerate(steps):
            flow = self._forward(x, timestep, f0)
            x0 = self.schedule.flow_to_x0(flow, x, timestep)
            if k + 1 < len(steps):
                eps = self.noise.renoise(shape, f0, k).to(self.device, self.dtype)
                x = self.schedule.add_noise(x0, eps, steps[k + 1])
        # The clean context pass: the block's cache slots now hold its clean keys (§4.3 step 3).
        self._forward(x0, self.sampler.context_noise, f0)
        # A static buffer, shifted in place (no new tensor per block).
        self.history[:, :-frames] = self.history[:, frames:].clone()
        self.history[:, -frames:] = x0
        self.frame += frames
        self._track_drift(x0)
        return x0
