"""LongLive 2.0's self-attention cache: a global sink plus one pinned shot sink (docs/engine-longlive2.md).

The reference's pointer semantics (those of 1.0's cache: `global_end`/`local_end`, repeated
passes over a block overwrite its slots, a full window rolls), in a class of its own so the
1.0 cache can change its layout freely, with the reference's multi-shot sink on top:

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

from engine.model import apply_rope


@dataclass(frozen=True)
class ShotPlan:
    """What one pass does to the cache: the reference's pointers, host integers only.

    `query_angles` and `mask` are what `engine.model.SelfAttention` reads from any plan.
    """

    current_start: int
    n_new: int
    roll: tuple[int, int] | None  # (evicted tokens, kept tokens) moved down to `roll_sink`
    local_start: int
    local_end: int
    is_recompute: bool
    query_angles: tuple[torch.Tensor, torch.Tensor]
    roll_sink: int = 0  # the prefix a roll keeps: global sink (+ the pin when adjacent)
    pin_shift: int = 0  # how far a floating pin moves left with this pass's eviction
    mask: torch.Tensor | None = None  # never: streaming attends to exactly [0, local_end)


class ShotKVCache:
    """Self-attention K/V of all layers with LongLive 2.0's global sink and pinned shot sink.

    Static buffers [layers, B, window tokens, heads, head_dim], written in place; keys are
    stored after RoPE (absolute positions, as the reference).
    """

    def __init__(self, num_layers: int, batch: int, frames: int, sink_frames: int, frame_seq_length: int,
                 heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str):
        if sink_frames >= frames:
            raise ValueError(f"sink ({sink_frames} frames) must be smaller than the window ({frames})")
        self.capacity = frames * frame_seq_length
        self.sink = sink_frames * frame_seq_length
        self.frame_seq_length = frame_seq_length
        shape = (num_layers, batch, self.capacity, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.global_end = 0  # absolute token index one past the last block written
        self.local_end = 0  # buffer position one past the last valid token
        self.pinned_start = -1
        self.pinned_len = 0

    def reset(self) -> None:
        """Empty the cache and drop the pin."""
        self.k.zero_()
        self.v.zero_()
        self.global_end = self.local_end = 0
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
        return ShotPlan(current_start, n_new, roll, local_start, local_end, is_recompute, query_angles,
                        roll_sink=sink, pin_shift=pin_shift)

    def rewrite_plan(self, slot_start: int, n_new: int,
                     query_angles: tuple[torch.Tensor, torch.Tensor]) -> ShotPlan:
        """A pass that overwrites buffer slots [slot_start, +n_new) and sees [0, slot end): a recache."""
        end = slot_start + n_new
        if slot_start < 0 or end > self.local_end:
            raise ValueError(f"slots {slot_start}..{end} are not in the filled buffer (0..{self.local_end})")
        return ShotPlan(self.global_end, n_new, None, slot_start, end, True, query_angles)

    def update_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: ShotPlan,
                        rope: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Roll (keeping the effective sink), write this layer's roped K/V, return [0, local_end).

        `rope` is accepted and unused: the plan carries the angles (older model code passes it).
        """
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
        """Advance the pointers and move a floating pin with the eviction (after all layers ran).

        A repeated pass over the same block (later steps, the clean pass) changes no pointer.
        """
        if plan.is_recompute:
            return
        self.global_end = plan.current_start + plan.n_new
        self.local_end = plan.local_end
        if plan.pin_shift:
            self.pinned_start -= plan.pin_shift

    def pin_last(self, frames: int, sink_frames: int) -> None:
        """Pin the block just written (its `frames` frames end at local_end) as the shot sink."""
        tokens = frames * self.frame_seq_length
        self.pinned_start = self.local_end - tokens
        self.pinned_len = min(sink_frames * self.frame_seq_length, tokens)
