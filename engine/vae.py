"""The Wan2.1 causal 3D VAE decoder, with streaming decode (engine-spec §7).

Only the decoder half is built: `conv2` (1x1x1) and `decoder.*`, under Wan's parameter names,
so the decoder keys of the official `Wan2.1_VAE.pth` load strictly; the encoder keys
(`encoder.*`, `conv1.*`) in the same file are skipped.

The decoder always runs one latent frame at a time. Every causal conv with temporal context
keeps the last 2 frames of its input in a per-decoder cache slot and puts them in front of
the next input instead of zero padding, so a video decoded block by block equals the same
video decoded in one call. The two temporal upsamplers skip their time conv on the very
first latent frame of a video (Wan's "Rep" state): that frame gives 1 pixel frame, every
later latent gives 4. See docs/vae.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoints import CheckpointError, check_state_dict, read_checkpoint
from engine.progress import LoadProgress

# Per-channel statistics of Wan2.1's latent space (hard-coded in Wan and LongLive, not in the file).
# The DiT works on (z - mean) / std; the decoder needs z back.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

DECODER_PREFIXES = ("decoder.", "conv2.")
ENCODER_PREFIXES = ("encoder.", "conv1.")


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the VAE decoder (Wan's `_video_vae` arguments, decoder side)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Per upsampling stage, whether it also doubles time (Wan's `temperal_downsample` reversed).
    temperal_upsample: tuple[bool, ...] = (True, True, False)

    def __post_init__(self) -> None:
        if len(self.temperal_upsample) != len(self.dim_mult) - 1:
            raise ValueError("temperal_upsample needs one entry per upsampling stage (len(dim_mult) - 1)")

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> VAEConfig:
        """The decoder width a checkpoint was saved with (Wan's structure otherwise)."""
        try:
            width, z_dim = state["decoder.conv1.weight"].shape[:2]
        except KeyError:
            raise ValueError("not a Wan VAE state dict (no decoder.conv1.weight)") from None
        mult = cls.dim_mult
        return cls(dim=width // mult[-1], z_dim=z_dim)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W (8)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame after the first (4)."""
        return 2 ** sum(self.temperal_upsample)

    def pixel_frames(self, latent_frames: int, first: bool = True) -> int:
        """Pixel frames out for `latent_frames` latents; `first`: they start the video."""
        if latent_frames <= 0:
            return 0
        return self.temporal_factor * latent_frames - (self.temporal_factor - 1 if first else 0)


PRESETS = {
    "wan2.1": VAEConfig(),
    # Same structure at 1/24 of the width: every code path, a 1 MB checkpoint (tests).
    "tiny": VAEConfig(dim=4),
}


class _FirstFrameSeen:
    """Cache state of a temporal upsampler after the first latent frame (Wan's "Rep")."""

    def __repr__(self) -> str:
        return "FIRST_FRAME_SEEN"


FIRST_FRAME_SEEN = _FirstFrameSeen()
Cache = list  # one entry per cache slot: None, FIRST_FRAME_SEEN or a tensor [B, C, 2, H, W]


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


class CausalConv3d(nn.Conv3d):
    """A Conv3d that pads H and W symmetrically and time only on the past side.

    The `2 * padding[0]` past frames are zeros at the start of a video and, when the conv owns
    a cache slot, the last frames of its previous input afterwards.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 padding: int | tuple[int, int, int] = 0):
        pt, ph, pw = _triple(padding)
        super().__init__(in_channels, out_channels, kernel_size, padding=(0, ph, pw))
        self.past = 2 * pt
        self.slot = -1  # cache index, assigned by Decoder3d

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        if self.past == 0:
            return super().forward(x)
        prev = cache[self.slot] if cache is not None else None
        if isinstance(prev, torch.Tensor):
            x = torch.cat([prev, x], dim=2)
        else:
            x = F.pad(x, (0, 0, 0, 0, self.past, 0))
        if cache is not None:
            # Zeros stand in for missing history: same values as padding them again next time.
            cache[self.slot] = x[:, :, -self.past:].clone()
        return super().forward(x)


class RMSNorm(nn.Module):
    """L2-normalise over channels (dim 1), times sqrt(C) and a per-channel gain; no bias."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1).mul_(self.scale).mul_(self.gamma)


class ResidualBlock(nn.Module):
    """norm -> SiLU -> conv3 -> norm -> SiLU -> conv3, plus a (1x1x1 conv) shortcut."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Indices fixed by Wan's keys: residual.{0,3}.gamma, residual.{2,6}.{weight,bias}.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Identity(),  # (dropout in training)
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        r = self.residual
        skip = x if self.shortcut is None else self.shortcut(x)
        y = r[2](F.silu(r[0](x), inplace=True), cache)
        y = r[6](F.silu(r[3](y), inplace=True), cache)
        return y.add_(skip)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        tokens = self.norm(frames).flatten(2).transpose(1, 2)  # [bt, hw, c]
        # 1x1 convs as matmuls on the token layout; q, k, v are strided views of one buffer.
        qkv = F.linear(tokens, self.to_qkv.weight.flatten(1), self.to_qkv.bias)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = F.linear(out, self.proj.weight.flatten(1), self.proj.bias)
        out = out.transpose(1, 2).reshape(b, t, c, h, w).transpose(1, 2).contiguous()
        return out.add_(x)


class Resample(nn.Module):
    """2x nearest spatial upsampling + 3x3 conv halving the channels; `upsample3d` also doubles time.

    The time doubling is a causal (3,1,1) conv to 2C channels whose halves become the even and
    odd output frames. It is skipped on the first latent frame of a video (1 frame stays 1).
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d"):
            raise ValueError(f"unsupported resample mode {mode!r}")
        self.mode = mode
        self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                      nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = (CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
                          if mode == "upsample3d" else None)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = None
        if self.time_conv is not None and cache is not None:
            slot = self.time_conv.slot
            if cache[slot] is None:
                cache[slot] = FIRST_FRAME_SEEN  # first latent of the video: no time upsampling
            else:
                if cache[slot] is FIRST_FRAME_SEEN:
                    cache[slot] = None  # second latent: zero history (not the first frame)
                y = self.time_conv(x, cache)
                # channels [a | b] -> frames a0, b0, a1, b1, ... in (b t) c h w order
                frames = y.view(b, 2, c, t, h, w).permute(0, 3, 1, 2, 4, 5).reshape(b * t * 2, c, h, w)
                t *= 2
        if frames is None:
            frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        # Nearest is a pure copy: exact in any dtype (Wan upcasts to fp32 only for old bf16 kernels).
        frames = F.interpolate(frames, scale_factor=2.0, mode="nearest-exact")
        frames = self.resample[1](frames)
        return frames.view(b, t, *frames.shape[1:]).transpose(1, 2).contiguous()


class Decoder3d(nn.Module):
    """Wan's `decoder`: conv1 -> middle (res, attn, res) -> upsample stages -> head; one latent per call."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        blocks: list[nn.Module] = []
        in_dim = dims[0]
        for stage, out_dim in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(cfg.temperal_upsample):
                mode = "upsample3d" if cfg.temperal_upsample[stage] else "upsample2d"
                blocks.append(Resample(out_dim, mode))
                in_dim = out_dim // 2
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(in_dim, images=False), nn.SiLU(),
                                  CausalConv3d(in_dim, 3, 3, padding=1))
        self.num_cache_slots = 0
        for module in self.modules():
            if isinstance(module, CausalConv3d) and module.past > 0:
                module.slot = self.num_cache_slots
                self.num_cache_slots += 1

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """[B, z_dim, 1, h, w] (after `conv2`) -> [B, 3, 1 or 4, 8h, 8w]."""
        x = self.conv1(x, cache)
        for block in self.middle:
            x = block(x, cache)
        for block in self.upsamples:
            x = block(x, cache)
        return self.head[2](F.silu(self.head[0](x), inplace=True), cache)


class WanVAEDecoder(nn.Module):
    """The decoder half of Wan's VAE (`conv2` + `decoder`), stateless: callers own the cache."""

    def __init__(self, cfg: VAEConfig = PRESETS["wan2.1"]):
        super().__init__()
        self.cfg = cfg
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    def new_cache(self) -> Cache:
        """An empty feature cache (one slot per causal conv with temporal context)."""
        return [None] * self.decoder.num_cache_slots

    def forward(self, z: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Un-normalised latents [B, z_dim, F, h, w] -> pixels [B, 3, T, 8h, 8w] (not clamped)."""
        x = self.conv2(z)
        outs = [self.decoder(x[:, :, i:i + 1], cache) for i in range(x.shape[2])]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Pixels [..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3], as LongLive's saved videos.

    (x * 0.5 + 0.5).clamp(0, 1) * 255 in fp32, then truncated (torchvision `write_video`
    casts the float array to uint8).
    """
    x = video.float().mul(0.5).add_(0.5).clamp_(0.0, 1.0).mul_(255.0)
    return x.to(torch.uint8).movedim(-3, -1).contiguous()


class StreamingDecoder:
    """Decodes a video block by block with a persistent feature cache.

    `decode_block` takes the DiT's normalised latents [B, F, 16, h, w]; the first block of a
    video gives 4F - 3 pixel frames, later blocks 4F. `reset()` before a new video.
    """

    def __init__(self, decoder: WanVAEDecoder):
        self.decoder = decoder
        self._stats: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the previous video: empty cache; the next latent is a first frame."""
        self.cache: Cache = self.decoder.new_cache()
        self.latents_decoded = 0
        self.cache_batch = 0

    def _unnormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """z = z_model / (1 / std) + mean in the decoder's dtype (LongLive's wrapper) -> [B, C, F, h, w]."""
        param = self.decoder.conv2.weight
        z = latents.to(device=param.device, dtype=param.dtype)
        key = (z.device, z.dtype)
        if key not in self._stats:
            mean = torch.tensor(LATENT_MEAN, dtype=torch.float32).to(device=z.device, dtype=z.dtype)
            std = torch.tensor(LATENT_STD, dtype=torch.float32).to(device=z.device, dtype=z.dtype)
            self._stats[key] = (mean.view(1, 1, -1, 1, 1), (1.0 / std).view(1, 1, -1, 1, 1))
        mean, inv_std = self._stats[key]
        return (z / inv_std + mean).transpose(1, 2).contiguous()

    @torch.inference_mode()
    def decode_block_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, F, 16, h, w] -> fp32 pixels [B, T, 3, 8h, 8w] clamped to [-1, 1]."""
        cfg = self.decoder.cfg
        if latents.ndim != 5 or latents.shape[2] != cfg.z_dim or latents.shape[1] == 0:
            raise ValueError(f"expected latents [B, F>0, {cfg.z_dim}, h, w], got {tuple(latents.shape)}")
        if self.latents_decoded and latents.shape[0] != self.cache_batch:
            raise ValueError(f"batch {latents.shape[0]} != {self.cache_batch} of the cached video; "
                             "reset() first")
        out = self.decoder(self._unnormalise(latents), self.cache)
        self.latents_decoded += latents.shape[1]
        self.cache_batch = latents.shape[0]
        return out.float().clamp_(-1.0, 1.0).transpose(1, 2)

    @torch.inference_mode()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [1, F, 16, h, w] -> uint8 RGB frames [T, 8h, 8w, 3] (9 then 12 for F = 3)."""
        if latents.shape[0] != 1:
            raise ValueError(f"decode_block takes one video (B = 1), got B = {latents.shape[0]}")
        return to_uint8(self.decode_block_float(latents)[0])

    @torch.inference_mode()
    def decode_video_float(self, latents: torch.Tensor) -> torch.Tensor:
        """A whole video from a fresh cache: [B, F, 16, h, w] -> fp32 [B, 4F - 3, 3, 8h, 8w]."""
        self.reset()
        return self.decode_block_float(latents)

    @torch.inference_mode()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """A whole video from a fresh cache: [1, F, 16, h, w] -> uint8 [4F - 3, 8h, 8w, 3]."""
        self.reset()
        return self.decode_block(latents)


def decoder_shapes(cfg: VAEConfig = PRESETS["wan2.1"]) -> dict[str, tuple[int, ...]]:
    """The decoder's state-dict keys and shapes (built on the meta device)."""
    with torch.device("meta"):
        model = WanVAEDecoder(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict (str -> tensor) like Wan2.1_VAE.pth, "
                              f"got {type(obj).__name__}")
    return obj


def load_vae_decoder(path: str | Path, cfg: VAEConfig = PRESETS["wan2.1"], device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32,
                     progress: LoadProgress | None = None) -> WanVAEDecoder:
    """The decoder of a Wan VAE checkpoint (`Wan2.1_VAE.pth` layout), built on meta and assigned.

    Encoder keys (`encoder.*`, `conv1.*`) are skipped; every other key must be exactly a decoder
    key of `cfg` with the same shape, else CheckpointError naming the file and the keys.
    """
    path = Path(path)
    state = {k: v for k, v in _read_pth(path).items() if not k.startswith(ENCODER_PREFIXES)}
    if not any(k.startswith(DECODER_PREFIXES) for k in state):
        raise CheckpointError(f"{path}: no decoder keys (decoder.*, conv2.*): encoder-only or not a Wan VAE")
    check_state_dict(state, decoder_shapes(cfg), path)
    with torch.device("meta"):
        model = WanVAEDecoder(cfg)
    loaded = {}
    for key, tensor in state.items():
        loaded[key] = tensor.to(device=device, dtype=dtype)
        if progress is not None:
            progress.advance(path, tensor.numel() * tensor.element_size())
    if progress is not None:
        progress.finish(path)
    model.load_state_dict(loaded, strict=True, assign=True)
    return model.eval().requires_grad_(False)
