"""LongLive 2.0's self-attention cache: a global sink plus one pinned shot sink (docs/engine-longlive2.md).

Same buffer and pointers as 1.0 (`engine.cache.KVCache`: [layers, B, capacity, heads,
head_dim], `global_end`/`local_end`, repeated passes over a block overwrite its slots), with
the reference's multi-shot sink on top:

- at a shot cut the block just written is *pinned* (`pinned_start`, `pinned_len`): nothing
  is copied, the block stays where it is;
- a roll keeps the prefix `[0, effective_sink)`, where effective_sink is the global sink,
  plus the pin when the pin sits right after it. A floating pin moves left with the
  eviction until it reaches the global sink and from then on is kept like a sink.

Attention always reads `[0, local_end)`: at inference the attention window equals the
buffer (local_attn_size frames), so the reference's sink/pin prepending never triggers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.cache import KVCache, SelfAttnPlan
from engine.model import Rope, apply_rope


@dataclass(frozen=True)
class ShotPlan(SelfAttnPlan):
    """A 1.0 plan plus where the roll keeps its prefix and how far the pin moves."""

    roll_sink: int = 0
    pin_shift: int = 0


class ShotKVCache(KVCache):
    """`KVCache` with LongLive 2.0's pinned shot sink; keys are stored post-RoPE (absolute positions)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pinned_start = -1
        self.pinned_len = 0

    def reset(self) -> None:
        """Empty the cache and drop the pin."""
        super().reset()
        self.pinned_start, self.pinned_len = -1, 0

    @property
    def effective_sink(self) -> int:
        """Tokens a roll never moves: the global sink, plus the pin when it is adjacent to it."""
        if self.pinned_len > 0 and self.pinned_start == self.sink:
            return self.sink + self.pinned_len
        return self.sink

    def shot_plan(self, current_start: int, n_new: int,
                  query_angles: tuple[torch.Tensor, torch.Tensor]) -> ShotPlan:
        """The reference's pointer arithmetic for one pass at absolute token `current_start`."""
        fs = self.frame_seq_length
        if current_start % fs or n_new % fs:
            raise ValueError("passes must cover whole latent frames")
        g, e, capacity = self.global_end, self.local_end, self.capacity
        current_end = current_start + n_new
        sink = self.effective_sink
        roll, pin_shift = None, 0
        if current_end > g and n_new + e > capacity:
            evicted = n_new + e - capacity
            kept = e - evicted - sink
            if kept < 0:
                raise ValueError(f"a pass of {n_new // fs} frames does not fit the window beside the sink")
            roll = (evicted, kept)
            local_end = e + (current_end - g) - evicted
            if self.pinned_len > 0 and self.pinned_start >= sink:
                pin_shift = evicted
        else:
            local_end = e + (current_end - g)
        local_start = local_end - n_new
        if local_start < 0:
            raise ValueError(f"pass at token {current_start} reaches before the cached window")
        is_recompute = current_end <= g and current_start > 0
        return ShotPlan(current_start, n_new, roll, local_start, local_end, local_start, is_recompute,
                        query_angles, None, None, roll_sink=sink, pin_shift=pin_shift)

    def rewrite_plan(self, slot_start: int, n_new: int,
                     query_angles: tuple[torch.Tensor, torch.Tensor]) -> ShotPlan:
        """A pass that overwrites buffer slots [slot_start, +n_new) and sees [0, slot end): a recache."""
        end = slot_start + n_new
        if slot_start < 0 or end > self.local_end:
            raise ValueError(f"slots {slot_start}..{end} are not in the filled buffer (0..{self.local_end})")
        return ShotPlan(self.global_end, n_new, None, slot_start, end, slot_start, True, query_angles, None)

    def update_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: ShotPlan,
                        rope: Rope | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Roll (keeping the effective sink), write this layer's roped K/V, return [0, local_end)."""
        buf_k, buf_v = self.k[layer], self.v[layer]
        if plan.roll is not None:
            evicted, kept = plan.roll
            s = plan.roll_sink
            buf_k[:, s:s + kept] = buf_k[:, s + evicted:s + evicted + kept].clone()
            buf_v[:, s:s + kept] = buf_v[:, s + evicted:s + evicted + kept].clone()
        buf_k[:, plan.local_start:plan.local_end] = apply_rope(k, *plan.query_angles)
        buf_v[:, plan.local_start:plan.local_end] = v
        return buf_k[:, :plan.local_end], buf_v[:, :plan.local_end]

    def commit(self, plan: ShotPlan) -> None:
        """Advance the pointers and move a floating pin with the eviction (after all layers ran)."""
        super().commit(plan)
        if not plan.is_recompute and plan.pin_shift:
            self.pinned_start -= plan.pin_shift

    def pin_last(self, frames: int, sink_frames: int) -> None:
        """Pin the block just written (its `frames` frames end at local_end) as the shot sink."""
        tokens = frames * self.frame_seq_length
        self.pinned_start = self.local_end - tokens
        self.pinned_len = min(sink_frames * self.frame_seq_length, tokens)
