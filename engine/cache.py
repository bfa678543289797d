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
    """What one forward pass does to the cache: tensors and constants only, so a compiled step
    sees the same plan shape on every steady pass (engine/generator.py)."""

    write_index: torch.Tensor  # physical slots the new K/V go to (long; not the first `skip` new tokens)
    skip: int  # leading new tokens not written (the protected sink of a recompute)
    read_len: int  # physical tokens [0, read_len) attended
    query_angles: tuple[torch.Tensor, torch.Tensor]
    key_angles: tuple[torch.Tensor, torch.Tensor] | None  # relative mode: per physical slot
    mask: torch.Tensor | None = None  # only for whole-sequence (non-streaming) passes


@dataclass(frozen=True)
class PassPointers:
    """The host-side pointer arithmetic of one pass (§3.3 steps 2-4), applied by `commit`."""

    current_start: int
    n_new: int
    evicted: int  # rolling-window tokens that leave (0 unless the pass rolls)
    local_start: int  # logical token positions of the new tokens
    local_end: int
    is_recompute: bool


class KVCache:
    """Self-attention K/V for all layers, with the sink + window pointers.

    The buffer is [sink | ring]: the sink frames sit at the front and never move; the rolling
    window is a ring whose logical order starts at `ring_offset`. Eviction moves the offset
    instead of copying the window down (the reference copies every layer's window per block),
    so a steady pass writes its block into fixed slots by index and reads the whole buffer: the
    same shapes and no allocation on every pass, which is what torch.compile and CUDA graphs need.
    """

    def __init__(self, num_layers: int, batch: int, frames: int, sink_frames: int, frame_seq_length: int,
                 heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 rope_mode: RopeMode = "absolute"):
        if sink_frames >= frames:
            raise ValueError(f"sink ({sink_frames} frames) must be smaller than the window ({frames})")
        self.capacity = frames * frame_seq_length
        self.sink = sink_frames * frame_seq_length
        self.ring = self.capacity - self.sink
        self.frame_seq_length = frame_seq_length
        self.window_frames = frames
        self.rope_mode = rope_mode
        shape = (num_layers, batch, self.capacity, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.global_end = 0  # absolute token index one past the last block written
        self.local_end = 0  # logical position one past the last valid token
        self.ring_offset = 0  # physical ring slot (tokens) of the logically oldest window token
        self._index: dict[tuple[int, int, int], torch.Tensor] = {}  # write indices, per (offset, start, n)
        self._angles: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # RoPE tables, built once

    def reset(self) -> None:
        """Empty the cache for a new stream."""
        self.zero_()
        self.global_end = self.local_end = self.ring_offset = 0

    def zero_(self) -> None:
        """Zero K/V but keep the pointers (a `global_sink: false` recache, §5.2 step 1)."""
        self.k.zero_()
        self.v.zero_()

    @property
    def full(self) -> bool:
        """True once sink and window are full: every pass then has the same (steady) shapes."""
        return self.local_end == self.capacity

    def physical(self, logical: torch.Tensor, offset: int | None = None) -> torch.Tensor:
        """Buffer slots of logical token positions (the sink maps to itself)."""
        offset = self.ring_offset if offset is None else offset
        ring = self.sink + (logical - self.sink + offset) % self.ring
        return torch.where(logical < self.sink, logical, ring)

    def logical_view(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (k or v, [layers, B, capacity, ...]) in logical order: sink, then oldest to newest."""
        order = self.physical(torch.arange(self.capacity, device=t.device))
        return t.index_select(2, order)

    def pointers(self, current_start: int, n_new: int) -> PassPointers:
        """The reference's pointer arithmetic for one pass (§3.3 steps 2-4), on the host."""
        fs = self.frame_seq_length
        if current_start % fs or n_new % fs:
            raise ValueError("passes must cover whole latent frames")
        g, e = self.global_end, self.local_end
        current_end = current_start + n_new
        if n_new > self.ring and current_end > g:
            raise ValueError(f"a pass of {n_new // fs} frames does not fit the window beside the sink")
        is_recompute = current_end <= g and current_start > 0
        evicted = n_new + e - self.capacity if current_end > g and n_new + e > self.capacity else 0
        local_end = e + (current_end - g) - evicted if current_end > g else e + (current_end - g)
        local_start = local_end - n_new
        if local_start < 0:
            raise ValueError(f"pass at token {current_start} reaches before the cached window")
        return PassPointers(current_start, n_new, evicted, local_start, local_end, is_recompute)

    def plan(self, current_start: int, n_new: int, rope: Rope, sink_recache: bool = False,
             mask: torch.Tensor | None = None) -> tuple[SelfAttnPlan, PassPointers]:
        """Pointers and the tensors a pass needs; `commit` the pointers after the pass."""
        ptr = self.pointers(current_start, n_new)
        fs = self.frame_seq_length
        offset = (self.ring_offset + ptr.evicted) % self.ring  # the pass sees the cache after its roll
        protect_sink = ptr.is_recompute and not sink_recache
        write_start = max(ptr.local_start, self.sink) if protect_sink else ptr.local_start
        index = self._write_index(offset, write_start, ptr.local_end - write_start)
        # Positions are host integers: building the angles never waits on the device.
        if self.rope_mode == "absolute":
            query_angles = self._rope(rope, current_start // fs, n_new // fs)
            key_angles = None
        else:  # relative ("infinity"): a key's position is its logical slot, always < window
            query_angles = self._rope(rope, ptr.local_start // fs, n_new // fs)
            key_angles = self._key_angles(rope, offset, ptr.local_end)
        skip = write_start - ptr.local_start
        plan = SelfAttnPlan(index, skip, ptr.local_end, query_angles, key_angles, mask)
        return plan, ptr

    def _write_index(self, offset: int, start: int, n: int) -> torch.Tensor:
        key = (offset, start, n)
        if key not in self._index:
            logical = torch.arange(start, start + n, device=self.k.device)
            self._index[key] = self.physical(logical, offset)
        return self._index[key]

    def _rope(self, rope: Rope, first: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("q", first, frames)
        if key not in self._angles:
            if len(self._angles) > 64:  # absolute mode walks through positions: keep the table small
                self._angles.clear()
            self._angles[key] = rope.angles(first, frames)
        return self._angles[key]

    def _key_angles(self, rope: Rope, offset: int, local_end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles for the physical slots [0, local_end): each slot rotated by its logical position."""
        key = ("k", offset, local_end)
        if key not in self._angles:
            cos, sin = rope.angles(0, local_end // self.frame_seq_length)
            if local_end == self.capacity and offset:
                physical = self.physical(torch.arange(self.capacity, device=cos.device), offset)
                order = torch.empty_like(physical)
                order[physical] = torch.arange(self.capacity, device=cos.device)  # logical of each slot
                cos, sin = cos[order], sin[order]
            self._angles[key] = (cos, sin)
        return self._angles[key]

    def update_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                        plan: SelfAttnPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new K/V in place (by index) and return the keys/values to attend to."""
        from engine.model import apply_rope

        buf_k, buf_v = self.k[layer], self.v[layer]
        if self.rope_mode == "absolute":
            k = apply_rope(k, *plan.query_angles)  # cached keys carry their absolute position
        if plan.skip:
            k, v = k[:, plan.skip:], v[:, plan.skip:]
        buf_k.index_copy_(1, plan.write_index, k)
        buf_v.index_copy_(1, plan.write_index, v)
        # Sink + window are [0, read_len): exactly what the reference attends (in ring order).
        keys, values = buf_k[:, :plan.read_len], buf_v[:, :plan.read_len]
        if plan.key_angles is not None:
            keys = apply_rope(keys, *plan.key_angles)
        return keys, values

    def commit(self, ptr: PassPointers) -> None:
        """Advance the pointers after all layers ran, unless the pass was a recompute (§3.3 step 7)."""
        if not ptr.is_recompute:
            self.ring_offset = (self.ring_offset + ptr.evicted) % self.ring
            self.global_end = ptr.current_start + ptr.n_new
            self.local_end = ptr.local_end

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
