"""A complete LongLive weights directory at test size, every file in its official format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from engine.checkpoints import LORA_TARGETS
from engine.model import PRESETS
from engine.random_weights import write_random_weights
from engine.text_encoder import UMT5Config
from engine.vae import PRESETS as VAE_PRESETS
from engine.weights import WeightPaths

DATA = Path(__file__).parent / "data"
TINY = PRESETS["tiny"]
# Engine frame size whose latents (/8) match the tiny DiT's 8x12 golden geometry.
WIDTH, HEIGHT = 96, 64


def write_tiny_weights(root: Path, lora_rank: int = 4, seed: int = 0) -> WeightPaths:
    """Write base + LoRA + config + VAE + UMT5 + tokenizer in the download layout."""
    paths = WeightPaths(Path(root))
    paths.base.parent.mkdir(parents=True, exist_ok=True)
    paths.tokenizer.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / "longlive-tiny" / "longlive_base_tiny.pt", paths.base)  # {"generator": {"model.*"}}
    generator = torch.Generator().manual_seed(seed)
    shapes = {k: tuple(v.shape) for k, v in torch.load(paths.base, weights_only=True)["generator"].items()}
    lora = {}
    for i in range(TINY.num_layers):
        for target in LORA_TARGETS:
            out_dim, in_dim = shapes[f"model.blocks.{i}.{target}.weight"]
            prefix = f"base_model.model.blocks.{i}.{target}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(lora_rank, in_dim, generator=generator) * 0.02
            lora[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, lora_rank, generator=generator) * 0.02
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 0}, paths.lora)
    paths.dit_config.write_text(json.dumps({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v",
        "dim": TINY.dim, "eps": TINY.eps, "ffn_dim": TINY.ffn_dim, "freq_dim": TINY.freq_dim,
        "in_dim": TINY.in_dim, "num_heads": TINY.num_heads, "num_layers": TINY.num_layers,
        "out_dim": TINY.out_dim, "text_len": TINY.text_len, "text_dim": TINY.text_dim,
    }))
    shutil.copy(DATA / "wan-vae-tiny" / "vae_tiny.pth", paths.vae)
    shutil.copy(DATA / "umt5-tiny" / "umt5_tiny.pth", paths.text_encoder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DATA / "umt5-tiny" / name, paths.tokenizer / name)
    return paths


# The 1.3B DiT as the official files hold it (30 layers, 1536 wide, 12 heads, text_dim 4096,
# text_len 512), with a small LoRA, the tiny VAE and a one-layer 4096-wide UMT5: the
# full architecture where it matters for the DiT, seconds instead of minutes elsewhere.
FULL_ARCH_T5 = UMT5Config(vocab=96, dim=4096, dim_attn=64, dim_ffn=64, num_heads=1, num_layers=1,
                          text_len=512)


def write_full_arch_weights(root: Path) -> WeightPaths:
    """The 1.3B DiT (bf16 tensors in the official pickle layout, 2.8 GB) + LoRA, tiny VAE, small UMT5."""
    paths = write_random_weights(root, PRESETS["1.3b"], t5=FULL_ARCH_T5, vae=VAE_PRESETS["tiny"],
                                 dit_dtype=torch.bfloat16, t5_dtype=torch.float32, lora_rank=4)
    paths.tokenizer.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DATA / "umt5-tiny" / name, paths.tokenizer / name)
    return paths
