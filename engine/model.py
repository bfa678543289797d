"""The causal Wan2.1 DiT of LongLive, in plain PyTorch (engine-spec §2, §3).

Parameter names are Wan's, so official state dicts load without renaming. The model
takes one chunk of latent frames plus the stream caches and returns the flow
prediction; everything stateful (KV cache, pointers) lives in `engine.cache`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import attention
from engine.cache import CrossCache, KVCache, SelfAttnPlan


@dataclass(frozen=True)
class ModelConfig:
    """DiT shape plus the streaming geometry it is run with."""

    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    # Streaming geometry (latent frames): block, attention window (sink included), sink.
    latent_height: int = 60
    latent_width: int = 104
    num_frame_per_block: int = 3
    local_attn_size: int = 12
    sink_size: int = 3
    rope_max_frames: int = 1024

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.dim // self.num_heads

    @property
    def frame_seq_length(self) -> int:
        """Tokens per latent frame (1560 at 480x832), derived from the latent size."""
        return (self.latent_height // self.patch_size[1]) * (self.latent_width // self.patch_size[2])

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w) of one latent frame."""
        return self.latent_height // self.patch_size[1], self.latent_width // self.patch_size[2]

    def with_latent_size(self, height: int, width: int) -> ModelConfig:
        """The same model at another resolution (latent height/width = pixels / 8)."""
        return replace(self, latent_height=height, latent_width=width)


PRESETS: dict[str, ModelConfig] = {
    # Wan2.1-T2V-1.3B as LongLive 1.0 runs it: 480x832, block 3, window 12, sink 3.
    "1.3b": ModelConfig(),
    # The golden-vector size (tests/data/longlive-tiny/config.json).
    "tiny": ModelConfig(dim=64, ffn_dim=128, text_dim=32, text_len=16, num_heads=2, num_layers=2,
                        latent_height=8, latent_width=12),
    # A small but less degenerate preset for tests of geometry and speed.
    "small": ModelConfig(dim=128, ffn_dim=256, text_dim=64, text_len=32, num_heads=4, num_layers=2,
                         latent_height=8, latent_width=16),
}


# Parameters kept in fp32 when the model runs in bf16/fp16: the time embedding, every
# modulation table, norm3's affine and the output head, the parts Wan2.1 evaluates under
# autocast(float32). Together 17.4 M of the 1.3B model's 1,419 M (1.2 %; docs/engine.md).
FP32_PARAMETERS = re.compile(
    r"^(time_embedding\.|time_projection\.|head\.|blocks\.\d+\.(modulation|norm3\.))")


def keeps_fp32(name: str) -> bool:
    """True for a DiT parameter (state-dict key) that stays fp32 in every compute dtype."""
    return FP32_PARAMETERS.match(name) is not None


def parameter_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter is stored in when the model computes in `dtype`."""
    return torch.float32 if keeps_fp32(name) else dtype


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Timestep features: cos then sin, t on the 0..1000 scale, computed in float64 (§2.2)."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class RMSNorm(nn.Module):
    """Wan's RMSNorm over the full width, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in fp32, affine parameters included (as Wan2.1 runs it under autocast).

    Returns fp32: its callers modulate in fp32 before casting to the model dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def _fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear evaluated in fp32 whatever its parameters were cast to (a no-op cast when fp32)."""
    return F.linear(x.float(), layer.weight.float(), layer.bias.float())


class Rope:
    """3-axis rotary tables (t, h, w) with interleaved pairs and per-axis bases (§2.3).

    Kept as cos/sin in fp32 (computed in fp64), off the module so meta construction and
    dtype casts never touch them. The (h, w) part of a frame is the same for every frame,
    so it is built once; a pass only slices the temporal table by host integers (no sync).
    """

    def __init__(self, head_dim: int, max_frames: int, grid: tuple[int, int], device: torch.device):
        d = head_dim
        axes = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
        lengths = (max_frames, grid[0], grid[1])
        tables = []
        for axis_dim, length in zip(axes, lengths, strict=True):
            inv = 1.0 / torch.pow(10000.0, torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
            angles = torch.outer(torch.arange(length, dtype=torch.float64), inv)
            tables.append((torch.cos(angles).float().to(device), torch.sin(angles).float().to(device)))
        self.tables = tables
        (_, _), (ch, sh), (cw, sw) = tables
        h, w = grid
        self._spatial = tuple(
            torch.cat([a.view(h, 1, -1).expand(h, w, -1), b.view(1, w, -1).expand(h, w, -1)], -1)
            .reshape(h * w, -1)
            for a, b in ((ch, cw), (sh, sw)))  # cos, sin [h*w, (dh + dw) / 2]
        self.grid = grid
        self.max_frames = max_frames

    def angles(self, first_frame: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [tokens, 1, head_dim/2] for `frames` whole frames from temporal position `first_frame`."""
        if first_frame < 0 or first_frame + frames > self.max_frames:
            raise ValueError(f"temporal RoPE position {first_frame + frames - 1} beyond the table "
                             f"({self.max_frames} frames); use rope_mode 'relative' for unbounded streams")
        ct, st = self.tables[0]
        hw = self._spatial[0].shape[0]
        out = []
        for temporal, spatial in ((ct, self._spatial[0]), (st, self._spatial[1])):
            t = temporal[first_frame:first_frame + frames].view(frames, 1, -1).expand(frames, hw, -1)
            s = spatial.view(1, hw, -1).expand(frames, hw, -1)
            out.append(torch.cat([t, s], dim=-1).reshape(frames * hw, 1, -1))
        return out[0], out[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [B, L, heads, head_dim] in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    even, odd = xf[..., 0], xf[..., 1]
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class _Projections(nn.Module):
    """q, k, v, o projections with the RMSNorm over full-width q and k (Wan's names)."""

    def __init__(self, dim: int, num_heads: int, eps: float, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()


class SelfAttention(_Projections):
    """Causal self-attention over the stream's KV cache (§3.3)."""

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, plan: SelfAttnPlan) -> torch.Tensor:
        heads = self.num_heads
        q = self.norm_q(self.q(x)).unflatten(-1, (heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (heads, -1))
        v = self.v(x).unflatten(-1, (heads, -1))
        q_cos, q_sin = plan.query_angles
        q = apply_rope(q, q_cos, q_sin)
        keys, values = cache.update_and_read(layer, k, v, plan)
        return self.o(attention(q, keys, values, plan.mask).flatten(2))


class CrossAttention(_Projections):
    """Attention from video tokens to the 512 text tokens (no mask, no RoPE: §2.2, pitfall 6)."""

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the (embedded) prompt; cached per prompt by CrossCache."""
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        return self.o(attention(q, k, v).flatten(2))


class AttentionBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated FFN (§2.2 step 5)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps, cfg.qk_norm)
        self.norm3 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm \
            else nn.Identity()
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, cfg.qk_norm)
        self.norm2 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, layer: int, cache: KVCache, plan: SelfAttnPlan,
                text_k: torch.Tensor, text_v: torch.Tensor) -> torch.Tensor:
        """x: the fp32 residual stream [B, L, D]; e0: fp32 [B, F, 6, D]. Linears run in the model dtype."""
        frames = e0.shape[1]
        dtype = text_k.dtype
        # (shift, scale, gate) for self-attention, then for the FFN; one set per frame, in fp32.
        mod = (self.modulation.float().unsqueeze(1) + e0).chunk(6, dim=2)  # each [B, F, 1, D]

        def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return (h.unflatten(1, (frames, -1)) * (1 + scale) + shift).flatten(1, 2).to(dtype)

        def gated(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            return (y.float().unflatten(1, (frames, -1)) * gate).flatten(1, 2)

        y = self.self_attn(modulate(self.norm1(x), mod[0], mod[1]), layer, cache, plan)
        x = x + gated(y, mod[2])
        x = x + self.cross_attn(self.norm3(x).to(dtype), text_k, text_v).float()
        y = self.ffn(modulate(self.norm2(x), mod[3], mod[4]))
        return x + gated(y, mod[5])


class Head(nn.Module):
    """Output head: modulated by the time embedding e itself (no SiLU, no projection: pitfall 5)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """fp32 throughout, as Wan2.1's autocast(float32) region around the head."""
        frames = e.shape[1]
        shift, scale = (self.modulation.float().unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)
        h = self.norm(x).unflatten(1, (frames, -1)) * (1 + scale) + shift
        return _fp32_linear(self.head, h.flatten(1, 2))


class CausalWanModel(nn.Module):
    """The LongLive generator: Wan2.1 DiT run chunk by chunk over a KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([AttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self._rope: Rope | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the big linears (the fp32 islands aside)."""
        return self.patch_embedding.weight.dtype

    def cast(self, dtype: torch.dtype) -> CausalWanModel:
        """Cast to a compute dtype, keeping the fp32 islands (FP32_PARAMETERS) in fp32."""
        self.to(dtype)
        for name, param in self.named_parameters():
            if keeps_fp32(name):
                param.data = param.data.float()
        return self

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """Time embedding e [N, dim] of timesteps t [N] (0..1000 scale), in fp32."""
        s = sinusoidal_embedding(self.cfg.freq_dim, t).float()
        first, _, second = self.time_embedding
        return _fp32_linear(second, F.silu(_fp32_linear(first, s)))

    def rope(self) -> Rope:
        """The RoPE tables on the model's device (built on first use, never in the state dict)."""
        device = self.patch_embedding.weight.device
        if self._rope is None or self._rope.tables[0][0].device != device:
            cfg = self.cfg
            self._rope = Rope(cfg.head_dim, cfg.rope_max_frames, cfg.grid, device)
        return self._rope

    def encode_text(self, prompt_embeds: torch.Tensor, cache: CrossCache,
                    on_layer: Callable[[], None] | None = None) -> None:
        """Embed a prompt ([B, text_len, text_dim], zero past its tokens) and fill every layer's text K/V."""
        context = self.text_embedding(prompt_embeds.to(self.dtype))
        for i, block in enumerate(self.blocks):
            k, v = block.cross_attn.text_kv(context)
            cache.store(i, k, v)
            if on_layer is not None:
                on_layer()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cache: KVCache, plan: SelfAttnPlan,
                text: CrossCache, on_layer: Callable[[], None] | None = None) -> torch.Tensor:
        """Flow prediction (fp32) for latents x [B, C, F, H, W] at per-frame timesteps t [B, F].

        `on_layer` runs after each layer: a liveness signal that a slow pass (the 1.3B model on
        a CPU takes seconds) is still moving.
        """
        cfg = self.cfg
        _, _, frames, height, width = x.shape
        # The residual stream is fp32 (Wan2.1 adds the gated branches under autocast(float32)).
        tokens = self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2).float()
        e = self.embed_time(t.flatten())
        e0 = _fp32_linear(self.time_projection[1], F.silu(e)).unflatten(1, (6, cfg.dim)).unflatten(0, t.shape)
        for i, block in enumerate(self.blocks):
            text_k, text_v = text.get(i)
            tokens = block(tokens, e0, i, cache, plan, text_k, text_v)
            if on_layer is not None:
                on_layer()
        out = self.head(tokens, e.unflatten(0, t.shape))
        return self.unpatchify(out, frames, height, width)

    def unpatchify(self, out: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """[B, tokens, pt*ph*pw*C] -> [B, C, F*pt, H, W], channel fastest within a patch (§2.2 step 7)."""
        pt, ph, pw = self.cfg.patch_size
        gh, gw = height // ph, width // pw
        c = self.cfg.out_dim
        out = out.view(out.shape[0], frames, gh, gw, pt, ph, pw, c)
        out = torch.einsum("bfhwpqrc->bcfphqwr", out)
        return out.reshape(out.shape[0], c, frames * pt, gh * ph, gw * pw)


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of a config, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    return sum(p.numel() for p in model.parameters())
