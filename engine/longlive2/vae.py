"""The Wan2.2 VAE (48 latent channels, 16x16 spatial, 4x temporal) with a streaming causal decode.

Upstream LongLive 2.0 has no cached decode for this VAE (longlive2-notes §3.3); this one keeps
every causal conv's last 2 input frames across calls, so decoding block by block equals
decoding the whole video at once: 29 pixel frames for the first 8-latent block, 32 after.

Differences from Wan2.1 (`engine.vae`), all under Wan2.2's parameter names so
`Wan2.2_VAE.pth` loads strictly: pixels are patchified 2x2 into 12 channels before the
encoder and un-patchified after the decoder; every up/down stage adds a parameter-free
shortcut (DupUp3D / AvgDown3D: channel<->space/time reshuffles); the upsampling convs keep
the channel count. The first latent of a video gives one frame: its time upsamplers are
skipped and the shortcut drops the leading duplicated frame.

The encoder is built for one picture (image-to-video's first latent): a single frame runs
no temporal convolution with history, so no encoder cache is needed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoints import CheckpointError, check_state_dict
from engine.progress import LoadProgress
from engine.vae import (
    AttentionBlock,
    Cache,
    CausalConv3d,
    Resample,
    ResidualBlock,
    RMSNorm,
    StreamingDecoder,
    _read_pth,
)

# Per-channel statistics of Wan2.2's latent space (hard-coded in Wan2.2 / LongLive 2.0, not in the file).
LATENT_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
               0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
               -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
               -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
               0.3573, -0.0548, -0.1681, -0.0667)
LATENT_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
              0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
              0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
              0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)

PATCH = 2  # pixel patchify before the encoder / after the decoder


@dataclass(frozen=True)
class VAE22Config:
    """Wan2.2's `_video_vae` arguments (encoder width `dim`, decoder width `dec_dim`)."""

    dim: int = 160
    dec_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        """Per decoder stage, whether it doubles time."""
        return tuple(reversed(self.temperal_downsample))

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W (16)."""
        return PATCH * 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> VAE22Config:
        """The widths a checkpoint was saved with (Wan2.2's structure otherwise)."""
        try:
            dec_width, z_dim = state["decoder.conv1.weight"].shape[:2]
        except KeyError:
            raise ValueError("not a Wan VAE state dict (no decoder.conv1.weight)") from None
        enc = state.get("encoder.conv1.weight")
        mult = cls.dim_mult[-1]
        enc_width = int(enc.shape[0]) if enc is not None else cls.dim
        return cls(dim=enc_width, dec_dim=dec_width // mult, z_dim=z_dim)


PRESETS = {
    "wan2.2": VAE22Config(),
    "tiny": VAE22Config(dim=8, dec_dim=8),  # every code path, a small checkpoint (tests)
}


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, 2H, 2W] -> [B, 4C, F, H, W], channel = c*4 + r*2 + q for offsets (q along H, r along W)."""
    b, c, f, h, w = x.shape
    x = x.view(b, c, f, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, f, h // PATCH, w // PATCH)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `patchify`: [B, 4C, F, H, W] -> [B, C, F, 2H, 2W]."""
    b, c4, f, h, w = x.shape
    x = x.view(b, c4 // (PATCH * PATCH), PATCH, PATCH, f, h, w)  # c, r, q
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c4 // (PATCH * PATCH), f, h * PATCH, w * PATCH)


class Resample22(Resample):
    """Wan2.1's upsampler with Wan2.2's channel-preserving 3x3 conv (dim -> dim)."""

    def __init__(self, dim: int, mode: str):
        super().__init__(dim, mode)
        self.resample[1] = nn.Conv2d(dim, dim, 3, padding=1)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of an up stage: channels repeated, then unfolded into time and space."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim

    def forward(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        b, _, t, h, w = x.shape
        ft, fs = self.ft, self.fs
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first else x  # the first latent's duplicated past frame is dropped


class UpResidualBlock(nn.Module):
    """Wan2.2's decoder stage: residual blocks (+ an upsampler) beside a DupUp3D shortcut."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if up:
            layers.append(Resample22(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: Cache, first: bool) -> torch.Tensor:
        main = x
        for layer in self.upsamples:
            main = layer(main, cache)
        return main if self.avg_shortcut is None else main + self.avg_shortcut(x, first)


def _assign_slots(module: nn.Module) -> int:
    """Give every causal conv with temporal history its own cache slot; returns the slot count."""
    slots = 0
    for m in module.modules():
        if isinstance(m, CausalConv3d) and m.past > 0:
            m.slot = slots
            slots += 1
    return slots


class Decoder22(nn.Module):
    """Wan2.2's `decoder`, one latent frame per call: -> 12 channels (3 colours x 2x2 patch)."""

    def __init__(self, cfg: VAE22Config):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dec_dim * m for m in (mult[-1], *reversed(mult))]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        ups = cfg.temperal_upsample
        self.upsamples = nn.Sequential(*[
            UpResidualBlock(i_dim, o_dim, cfg.num_res_blocks + 1, i < len(ups) and ups[i], i != len(mult) - 1)
            for i, (i_dim, o_dim) in enumerate(itertools.pairwise(dims))])
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], 3 * PATCH * PATCH, 3, padding=1))
        self.num_cache_slots = _assign_slots(self)

    def forward(self, x: torch.Tensor, cache: Cache, first: bool,
                on_layer: Callable[[], None] | None = None) -> torch.Tensor:
        """[B, z_dim, 1, h, w] -> [B, 12, 1 (first latent) or 4, 8h, 8w]; `on_layer` after each stage."""
        x = self.conv1(x, cache)
        for block in self.middle:
            x = block(x, cache)
        for stage in self.upsamples:
            x = stage(x, cache, first)
            if on_layer is not None:
                on_layer()  # the engine's heartbeat: a full-size decode on a CPU takes seconds
        return self.head[2](F.silu(self.head[0](x)), cache)


class Wan22VAEDecoder(nn.Module):
    """`conv2` + `decoder` of the Wan2.2 VAE, stateless: the caller owns the cache (`new_cache`)."""

    def __init__(self, cfg: VAE22Config = PRESETS["wan2.2"]):
        super().__init__()
        self.cfg = cfg
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder22(cfg)

    def new_cache(self) -> Cache:
        """One slot per causal conv, plus a last slot that marks the video's first latent as seen."""
        return [None] * (self.decoder.num_cache_slots + 1)

    def forward(self, z: torch.Tensor, cache: Cache,
                on_layer: Callable[[], None] | None = None) -> torch.Tensor:
        """Un-normalised latents [B, 48, F, h, w] -> pixels [B, 3, T, 16h, 16w] (not clamped)."""
        x = self.conv2(z)
        outs = []
        for i in range(x.shape[2]):
            outs.append(self.decoder(x[:, :, i:i + 1], cache, cache[-1] is None, on_layer))
            cache[-1] = True
        return unpatchify(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of a down stage: time/space folded into channels, then group means."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, factor_t, factor_s
        self.group = in_dim * factor_t * factor_s * factor_s // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))  # causal: pad the past
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs).mean(dim=2)


class Downsample(nn.Module):
    """Zero-pad right/bottom + stride-2 3x3 conv; `downsample3d` owns a time conv (unused for a picture)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        temporal = mode == "downsample3d"
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        # The time conv only runs once a previous chunk exists; a single picture is always the first.
        b, c, t, h, w = x.shape
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.view(b, t, *y.shape[1:]).transpose(1, 2)


class DownResidualBlock(nn.Module):
    """Wan2.2's encoder stage: residual blocks (+ a downsampler) beside an AvgDown3D shortcut."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if down:
            layers.append(Downsample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.downsamples:
            y = layer(y)
        return y + self.avg_shortcut(x)


class Encoder22(nn.Module):
    """Wan2.2's `encoder` for one frame: 12 patch channels -> 2 x z_dim (mean, log-variance)."""

    def __init__(self, cfg: VAE22Config):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, dims[0], 3, padding=1)
        down = cfg.temperal_downsample
        self.downsamples = nn.Sequential(*[
            DownResidualBlock(i_dim, o_dim, cfg.num_res_blocks, i < len(down) and down[i],
                              i != len(cfg.dim_mult) - 1)
            for i, (i_dim, o_dim) in enumerate(itertools.pairwise(dims))])
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                    ResidualBlock(dims[-1], dims[-1]))
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.downsamples:
            x = stage(x)
        for block in self.middle:
            x = block(x)
        return self.head[2](F.silu(self.head[0](x)))


class Wan22ImageEncoder(nn.Module):
    """`encoder` + `conv1` of the Wan2.2 VAE: a picture -> its normalised first latent (I2V)."""

    def __init__(self, cfg: VAE22Config = PRESETS["wan2.2"]):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder22(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, 1, H, W] in [-1, 1] -> the posterior mean [B, 48, 1, H/16, W/16] (not normalised)."""
        return self.conv1(self.encoder(patchify(x)))[:, :self.cfg.z_dim]

    @torch.inference_mode()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 RGB [H, W, 3] (H, W multiples of 16) -> normalised latent [1, 1, 48, H/16, W/16]."""
        param = self.conv1.weight
        x = image.to(param.device).permute(2, 0, 1).unsqueeze(0).unsqueeze(2).to(param.dtype)
        mu = self.encode_pixels(x / 127.5 - 1.0)
        mean = torch.tensor(LATENT_MEAN, device=mu.device, dtype=mu.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(LATENT_STD, device=mu.device, dtype=mu.dtype).view(1, -1, 1, 1, 1)
        return ((mu - mean) * (1.0 / std)).transpose(1, 2)


class StreamingDecoder22(StreamingDecoder):
    """`engine.vae.StreamingDecoder` with Wan2.2's latent statistics: 29 then 32 frames per 8-latent block."""

    def _unnormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """z = z_model / (1 / std) + mean with Wan2.2's 48 statistics -> [B, C, F, h, w]."""
        param = self.decoder.conv2.weight
        z = latents.to(device=param.device, dtype=param.dtype)
        key = (z.device, z.dtype)
        if key not in self._stats:  # built once per device/dtype, never per block
            mean = torch.tensor(LATENT_MEAN, dtype=torch.float32).to(device=z.device, dtype=z.dtype)
            std = torch.tensor(LATENT_STD, dtype=torch.float32).to(device=z.device, dtype=z.dtype)
            self._stats[key] = (mean.view(1, 1, -1, 1, 1), (1.0 / std).view(1, 1, -1, 1, 1))
        mean, inv_std = self._stats[key]
        return (z / inv_std + mean).transpose(1, 2).contiguous()


def vae_shapes(cfg: VAE22Config = PRESETS["wan2.2"]) -> dict[str, tuple[int, ...]]:
    """Every key of a Wan2.2 VAE checkpoint (encoder and decoder) with its shape, built on meta."""
    with torch.device("meta"):
        modules = {"": Wan22VAEDecoder(cfg), "enc": Wan22ImageEncoder(cfg)}
    return {k: tuple(v.shape) for m in modules.values() for k, v in m.state_dict().items()}


def load_vae22(path: str | Path, cfg: VAE22Config | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32,
               progress: LoadProgress | None = None) -> tuple[Wan22VAEDecoder, Wan22ImageEncoder]:
    """Decoder and image encoder of `Wan2.2_VAE.pth`, strictly checked, built on meta and assigned."""
    path = Path(path)
    state = _read_pth(path)
    try:
        cfg = cfg or VAE22Config.from_state_dict(state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    check_state_dict(state, vae_shapes(cfg), path)
    with torch.device("meta"):
        decoder, encoder = Wan22VAEDecoder(cfg), Wan22ImageEncoder(cfg)
    loaded = {}
    for key, tensor in state.items():
        loaded[key] = tensor.to(device=device, dtype=dtype)
        if progress is not None:
            progress.advance(path, tensor.numel() * tensor.element_size())
    if progress is not None:
        progress.finish(path)
    for module in (decoder, encoder):
        own = module.state_dict().keys()
        module.load_state_dict({k: loaded[k] for k in own}, strict=True, assign=True)
    return decoder.eval().requires_grad_(False), encoder.eval().requires_grad_(False)
