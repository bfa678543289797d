"""The Wan2.2-TI2V-5B DiT as LongLive 2.0 runs it (docs/engine-longlive2.md).

The block structure, key names and dtype policy are those of Wan2.1 (`engine.model`):
adaLN-6, RMS q/k norm, 3-axis RoPE, per-frame timestep, 2x2 patch. What changes is the
shape (48 latent channels, dim 3072, 24 heads) and the streaming geometry (8-frame blocks,
a 32-frame window, an 8-frame sink), so 2.0 reuses `CausalWanModel` with its own presets.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from engine.model import CausalWanModel, ModelConfig, Rope

VAE_STRIDE = 16  # pixels per latent along H and W: the Wan2.2 VAE's 2x2 patchify and three 2x upsamples
PATCH = 2  # DiT patch (h, w)
PIXEL_MULTIPLE = VAE_STRIDE * PATCH  # frame sizes must be multiples of 32
DEFAULT_WIDTH, DEFAULT_HEIGHT = 1280, 704

_GEOMETRY = dict(in_dim=48, out_dim=48, num_frame_per_block=8, local_attn_size=32, sink_size=8)

PRESETS: dict[str, ModelConfig] = {
    # Wan2.2-TI2V-5B at 1280x704 (latent 44x80, 880 tokens per frame): 4,999,787,712 parameters.
    "5b": ModelConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30,
                      latent_height=DEFAULT_HEIGHT // VAE_STRIDE, latent_width=DEFAULT_WIDTH // VAE_STRIDE,
                      **_GEOMETRY),
    # The golden-vector size (tests/data/longlive2-tiny/config.json): latent 4x6, 6 tokens per frame.
    "tiny": ModelConfig(dim=64, ffn_dim=128, text_dim=32, text_len=16, num_heads=2, num_layers=2,
                        latent_height=4, latent_width=6, **_GEOMETRY),
}


def at_size(cfg: ModelConfig, width: int, height: int) -> ModelConfig:
    """The same model for frames of width x height pixels (multiples of 32: VAE 16 x patch 2)."""
    if width <= 0 or height <= 0 or width % PIXEL_MULTIPLE or height % PIXEL_MULTIPLE:
        raise ValueError(f"LongLive 2.0 frame size must be positive multiples of {PIXEL_MULTIPLE} "
                         f"(VAE stride {VAE_STRIDE} x patch {PATCH}), got {width}x{height}")
    return cfg.with_latent_size(height // VAE_STRIDE, width // VAE_STRIDE)


def config_from_ti2v_json(path: str | Path, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT,
                          block: int = 8, window: int = 32, sink: int = 8) -> ModelConfig:
    """The DiT config from Wan2.2-TI2V-5B's `config.json` (model_type ti2v), with 2.0's streaming geometry."""
    from engine.checkpoints import config_from_wan_json

    cfg = config_from_wan_json(path, model_type="ti2v")
    cfg = replace(cfg, num_frame_per_block=block, local_attn_size=window, sink_size=sink)
    return at_size(cfg, width, height)


class ShotRope(Rope):
    """Wan's RoPE tables with the temporal table grown on demand.

    2.0 positions are the absolute latent frame plus the multi-shot offset (8 per shot cut),
    so a live stream passes the reference's 1024-row table after ~170 s. The reference then
    computes angles analytically, (position + offset) x frequency in fp64; a longer table built
    the same way gives the same angles without a host computation per pass.
    """

    def angles(self, first_frame: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `frames` frames from temporal position `first_frame` (any position >= 0)."""
        if first_frame + frames > self.max_frames:
            device = self.tables[0][0].device
            grow = max(2 * self.max_frames, first_frame + frames)
            head_dim = 2 * sum(t[0].shape[1] for t in self.tables)
            self.__init__(head_dim, grow, self.grid, device)
        return super().angles(first_frame, frames)


# TorchAO float8 is applied to the block linears only, as LongLive 2.0's utils/fp8.py does:
# the six embedding/projection/head linears stay bf16 (300 FP8 linears in the 5B model).
FP8_EXCLUDED = re.compile(r"^(text_embedding\.[02]|time_embedding\.[02]|time_projection\.1|head\.head)$")


def init_random_(model: nn.Module, seed: int = 0, period: int = 1_000_003) -> nn.Module:
    """Fill every parameter in place, in its own dtype (no fp32 copy of the model).

    Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.01), norm gains ~ 1 + N(0, 0.01), modulations ~
    N(0, 1/dim): O(1) activations, so timings see realistic attention. Drawing 5e9 normals takes
    minutes on a small CPU, so one prime-length normal sequence is tiled over each tensor (from a
    per-tensor offset): rows are shifted copies, never equal, and the fill is a memory copy.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.randn(period, generator=generator)
    with torch.no_grad():
        for i, (name, param) in enumerate(model.named_parameters()):
            if name.endswith("modulation"):
                scale, shift = 1 / math.sqrt(param.shape[-1]), 0.0
            elif "norm" in name:
                scale, shift = 0.1, 1.0
            elif name.endswith("bias"):
                scale, shift = 0.1, 0.0
            else:
                scale, shift = 1 / math.sqrt(param[0].numel()), 0.0  # fan in: all but the output dimension
            offset = (i * 7919) % period
            pattern = torch.roll(base, -offset).mul_(scale).add_(shift).to(param.device, param.dtype)
            flat = param.view(-1)
            for start in range(0, flat.numel(), period):
                chunk = flat[start:start + period]
                chunk.copy_(pattern[:chunk.numel()])
    return model


class UpcastLinear(nn.Linear):
    """A Linear whose half-precision weights are multiplied in fp32, one weight at a time.

    On CPUs without native bf16 (AVX2 only), PyTorch's bf16 GEMM is several times slower than
    upcasting the weight and running fp32; the stored weights stay bf16 (same memory, same keys),
    products accumulate in fp32 as a bf16 GEMM does, and the output is rounded back.
    """

    # One fp32 buffer per weight shape, reused: a fresh 176 MB upcast per call would be returned
    # to the OS and page-faulted back every time (most of a pass's time on a small CPU).
    _scratch: ClassVar[dict[tuple[int, ...], torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(self.weight.shape)
        weight = self._scratch.get(shape)
        if weight is None:
            weight = self._scratch[shape] = torch.empty(shape, dtype=torch.float32)
        weight.copy_(self.weight)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), weight, bias).to(x.dtype)


def needs_upcast(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True for half-precision weights on a CPU without AVX-512 (no native bf16/fp16 GEMM)."""
    half = dtype in (torch.bfloat16, torch.float16)
    cpu = torch.device(device).type == "cpu"
    return half and cpu and "AVX512" not in torch.backends.cpu.get_cpu_capability()


def upcast_cpu_linears_(model: nn.Module) -> int:
    """Switch half-precision CPU Linears to `UpcastLinear` where that is faster; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and needs_upcast(module.weight.device, module.weight.dtype):
            module.__class__ = UpcastLinear
            count += 1
    return count


def build_random(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                 seed: int = 0) -> CausalWanModel:
    """The DiT with random weights, allocated directly in `dtype` (fp32 islands kept): peak = one model."""
    with torch.device("meta"):
        model = CausalWanModel(cfg).cast(dtype)
    model.to_empty(device=device)
    init_random_(model, seed)
    upcast_cpu_linears_(model)
    return model.eval().requires_grad_(False)


def fp8_blocker(device: torch.device | str) -> str | None:
    """Why the FP8 (TorchAO float8 W8A8) path cannot run here, or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"FP8 needs CUDA (TorchAO float8 kernels, compute capability >= 8.9, as upstream "
                f"LongLive 2.0 validated on H100); this engine runs on {device.type}: use dtype bf16")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"FP8 needs compute capability >= 8.9 (Ada/Hopper); this GPU is {major}.{minor}: use bf16"
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "FP8 needs the torchao package (pip install torchao); not installed"
    return None


def quantize_fp8(model: CausalWanModel) -> CausalWanModel:
    """TorchAO float8 dynamic-activation/weight, per row, on the block linears (upstream's FP8 recipe)."""
    blocker = fp8_blocker(model.patch_embedding.weight.device)
    if blocker:
        raise RuntimeError(blocker)
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    targets = set(fp8_targets(model))
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, name: name in targets)
    return model


def fp8_targets(model: nn.Module) -> list[str]:
    """The Linears the FP8 path quantizes: every Linear but the six embedding/projection/head ones."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and FP8_EXCLUDED.match(name) is None]
