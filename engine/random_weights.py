"""Random weights at any size, in memory or written as the official LongLive/Wan files.

For measurements and rehearsals where the real weights cannot be had (no download, a GPU
host checking itself, CPU tests of the full 1.3B architecture): the files go through the
real loaders exactly as `download-weights` output would. Needs PyTorch and `engine/` only.

Layout written (engine/weights.py): `LongLive-1.3B/models/longlive_base.pt`
(`{"generator": {"model.<key>": t}}`), `LongLive-1.3B/models/lora.pt` (PEFT keys under
`generator_lora`), `Wan2.1-T2V-1.3B/config.json`, `Wan2.1_VAE.pth` (decoder keys and
`conv2.*`; the encoder half is not written: promptcast never loads it) and
`models_t5_umt5-xxl-enc-bf16.pth` (a plain state dict). No tokenizer: callers that need one
copy a folder in (gpu_check feeds token ids directly).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from engine.checkpoints import LORA_TARGETS
from engine.model import CausalWanModel, ModelConfig, parameter_dtype
from engine.text_encoder import UMT5Config, UMT5Encoder
from engine.vae import VAEConfig, WanVAEDecoder
from engine.weights import WeightPaths


def _init_(name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    """Fill one parameter in place the way a trained net is scaled: activations stay O(1)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        tensor.normal_(0.0, 0.02, generator=generator)
    elif tensor.ndim == 1 or leaf == "gamma":  # norm scales
        tensor.normal_(1.0, 0.05, generator=generator)
    elif "modulation" in name:
        tensor.normal_(0.0, tensor.shape[-1] ** -0.5, generator=generator)
    else:
        fan_in = math.prod(tensor.shape[1:]) if tensor.ndim > 1 else tensor.shape[0]
        tensor.normal_(0.0, fan_in ** -0.5, generator=generator)


def random_state(module: nn.Module, dtype_of, device: torch.device | str = "cpu",
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict for `module`'s keys and shapes; `dtype_of(key)` gives each tensor's dtype."""
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for key, ref in module.state_dict().items():
        tensor = torch.empty(ref.shape, dtype=dtype_of(key), device=device)
        _init_(key, tensor, generator)
        state[key] = tensor
    return state


def random_dit(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0) -> CausalWanModel:
    """A DiT with random weights built directly in its compute dtype (no fp32 copy on the way)."""
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    state = random_state(model, lambda key: parameter_dtype(key, dtype), device, seed)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def random_vae_decoder(cfg: VAEConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       seed: int = 0) -> WanVAEDecoder:
    """A VAE decoder with random weights built directly in `dtype` on `device`."""
    decoder = _meta(WanVAEDecoder, cfg)
    decoder.load_state_dict(random_state(decoder, lambda key: dtype, device, seed), strict=True, assign=True)
    return decoder.eval().requires_grad_(False)


def _meta(module_type, *args) -> nn.Module:
    with torch.device("meta"):
        return module_type(*args)


def _save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    torch.save({k: v.cpu() for k, v in state.items()}, path)


def write_random_weights(root: str | Path, dit: ModelConfig, *, t5: UMT5Config, vae: VAEConfig | None = None,
                         dit_dtype: torch.dtype = torch.float32, t5_dtype: torch.dtype = torch.bfloat16,
                         lora_rank: int = 256, device: torch.device | str = "cpu",
                         seed: int = 0) -> WeightPaths:
    """Write a complete weights directory of random tensors in the official layout; returns its paths.

    Official dtypes are fp32 DiT/LoRA/VAE and bf16 UMT5; `dit_dtype` may halve the DiT file (the
    loader casts whatever it finds). One file is in memory at a time.
    """
    paths = WeightPaths(Path(root))
    paths.base.parent.mkdir(parents=True, exist_ok=True)
    paths.wan.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v",
              **{f: getattr(dit, f) for f in ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "num_heads",
                                               "num_layers", "out_dim", "text_len", "text_dim")}}
    paths.dit_config.write_text(json.dumps(config, indent=2))
    model = _meta(CausalWanModel, dit)
    state = random_state(model, lambda key: dit_dtype, device, seed)
    torch.save({"generator": {f"model.{k}": v.cpu() for k, v in state.items()}}, paths.base)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    del state
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    lora = {}
    for i in range(dit.num_layers):
        for target in LORA_TARGETS:
            out_dim, in_dim = shapes[f"blocks.{i}.{target}.weight"]
            prefix = f"base_model.model.blocks.{i}.{target}"
            # PEFT initialises B to zero; a trained adapter is small but not zero.
            a = torch.randn(lora_rank, in_dim, generator=generator, device=device) * in_dim ** -0.5
            b = torch.randn(out_dim, lora_rank, generator=generator, device=device) * 0.01 / lora_rank ** 0.5
            lora[f"{prefix}.lora_A.weight"], lora[f"{prefix}.lora_B.weight"] = a.cpu(), b.cpu()
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 0}, paths.lora)
    del lora
    decoder = _meta(WanVAEDecoder, vae or VAEConfig())
    _save_state(random_state(decoder, lambda key: torch.float32, device, seed + 2), paths.vae)
    encoder = _meta(UMT5Encoder, t5)
    _save_state(random_state(encoder, lambda key: t5_dtype, device, seed + 3), paths.text_encoder)
    return paths
