"""The stream's attention caches: static, preallocated, written in place (engine-spec §3).

`KVCache` holds every layer's self-attention keys/values in one buffer
[layers, B, capacity, heads, head_dim] with the reference's pointer semantics: a frame
sink that is never evicted, a rolling local window, and "repeat passes over the same
block do not roll". A `SelfAttnPlan`, computed once per forward pass, says what every
layer does; each layer then applies it to its own slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from engine.model import Rope

RopeMode = Literal["absolute", "relative"]


@dataclass(frozen=True)
class SelfAttnPlan:
    """What one forward pass over `n_new` tokens does to the cache."""

    current_start: int
    n_new: int
    roll: tuple[int, int] | None  # (evicted tokens, kept tokens) moved down to the sink's end
    local_start: int
    local_end: int
    write_start: int
    is_recompute: bool
    query_angles: tuple[torch.Tensor, torch.Tensor]
    key_angles: tuple[torch.Tensor, torch.Tensor] | None  # relative mode: for the whole read window
    mask: torch.Tensor | None = None  # only for whole-sequence (non-streaming) passes


class KVCache:
    """Self-attention K/V for all layers, with the sink + window pointers."""

    def __init__(self, num_layers: int, batch: int, frames: int, sink_frames: int, frame_seq_length: int,
                 heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 rope_mode: RopeMode = "absolute"):
        if sink_frames >= frames:
            raise ValueError(f"sink ({sink_frames} frames) must be smaller than the window ({frames})")
        self.capacity = frames * frame_seq_length
        self.sink = sink_frames * frame_seq_length
        self.frame_seq_length = frame_seq_length
        self.window_frames = frames
        self.rope_mode = rope_mode
        shape = (num_layers, batch, self.capacity, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.global_end = 0  # absolute token index one past the last block written
        self.local_end = 0  # buffer position one past the last valid token

    def reset(self) -> None:
        """Empty the cache for a new stream."""
        self.zero_()
        self.global_end = self.local_end = 0

    def zero_(self) -> None:
        """Zero K/V but keep the pointers (a `global_sink: false` recache, §5.2 step 1)."""
        self.k.zero_()
        self.v.zero_()

    def plan(self, current_start: int, n_new: int, rope: Rope, sink_recache: bool = False,
             mask: torch.Tensor | None = None) -> SelfAttnPlan:
        """The reference's pointer arithmetic for one pass (§3.3 steps 2-4)."""
        fs = self.frame_seq_length
        if current_start % fs or n_new % fs:
            raise ValueError("passes must cover whole latent frames")
        capacity, sink = self.capacity, self.sink
        g, e = self.global_end, self.local_end
        current_end = current_start + n_new
        if n_new > capacity - sink and current_end > g:
            raise ValueError(f"a pass of {n_new // fs} frames does not fit the window beside the sink")
        is_recompute = current_end <= g and current_start > 0
        roll = None
        if current_end > g and n_new + e > capacity:
            evicted = n_new + e - capacity
            roll = (evicted, e - evicted - sink)
            local_end = e + (current_end - g) - evicted
        else:
            local_end = e + (current_end - g)
        local_start = local_end - n_new
        if local_start < 0:
            raise ValueError(f"pass at token {current_start} reaches before the cached window")
        protect_sink = is_recompute and not sink_recache
        write_start = max(local_start, sink) if protect_sink else local_start
        frames = n_new // fs
        # Positions are host integers: building the angles never waits on the device.
        if self.rope_mode == "absolute":
            query_angles = rope.angles(current_start // fs, frames)
            key_angles = None
        else:  # relative ("infinity"): positions are buffer slots, always < window
            query_angles = rope.angles(local_start // fs, frames)
            key_angles = rope.angles(0, local_end // fs)
        return SelfAttnPlan(current_start, n_new, roll, local_start, local_end, write_start, is_recompute,
                            query_angles, key_angles, mask)

    def update_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: SelfAttnPlan,
                        rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new K/V in place and return the keys/values to attend to."""
        from engine.model import apply_rope

        buf_k, buf_v = self.k[layer], self.v[layer]
        if plan.roll is not None:
            evicted, kept = plan.roll
            src = slice(self.sink + evicted, self.sink + evicted + kept)
            dst = slice(self.sink, self.sink + kept)
            # Overlapping ranges: copy through a temporary (the sink itself never moves).
            buf_k[:, dst] = buf_k[:, src].clone()
            buf_v[:, dst] = buf_v[:, src].clone()
        if self.rope_mode == "absolute":
            k = apply_rope(k, *plan.query_angles)  # cached keys carry their absolute position
        skip = plan.write_start - plan.local_start
        buf_k[:, plan.write_start:plan.local_end] = k[:, skip:]
        buf_v[:, plan.write_start:plan.local_end] = v[:, skip:]
        # Sink + window are contiguous: [0, local_end) is exactly what the reference attends.
        keys, values = buf_k[:, :plan.local_end], buf_v[:, :plan.local_end]
        if plan.key_angles is not None:
            keys = apply_rope(keys, *plan.key_angles)
        return keys, values

    def commit(self, plan: SelfAttnPlan) -> None:
        """Advance the pointers after all layers ran, unless the pass was a recompute (§3.3 step 7)."""
        if not plan.is_recompute:
            self.global_end = plan.current_start + plan.n_new
            self.local_end = plan.local_end

    def frames_in_buffer(self) -> int:
        """Valid latent frames currently held (sink included)."""
        return self.local_end // self.frame_seq_length


def stream_attention_mask(frames: int, block: int, window: int, sink: int, frame_seq_length: int,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """What streaming attends to, as one mask over a whole sequence (True = attend).

    A query in the block ending at frame `end` sees the sink frames [0, sink) and the
    window's most recent frames [max(sink, end - (window - sink)), end): block-causal,
    bidirectional inside a block.
    """
    f = torch.arange(frames, device=device)
    end = (f // block + 1) * block
    key = f.view(1, -1)
    recent = torch.clamp(end - (window - sink), min=sink).view(-1, 1)
    visible = (key < end.view(-1, 1)) & ((key < sink) | (key >= recent))
    return visible.repeat_interleave(frame_seq_length, 0).repeat_interleave(frame_seq_length, 1)


class CrossCache:
    """Per-layer text keys/values of the current prompt (§3.6), in static buffers."""

    def __init__(self, num_layers: int, batch: int, text_len: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, batch, text_len, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = False

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep one layer's prompt K/V."""
        self.k[layer].copy_(k)
        self.v[layer].copy_(v)
        self.valid = True

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's prompt K/V."""
        if not self.valid:
            raise RuntimeError("no prompt encoded into the cross-attention cache")
        return self.k[layer], self.v[layer]
