"""LongLive 2.0 weights at test size, every file in its official layout (Wan2.2 VAE, generator checkpoint)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from engine.longlive2.model import PRESETS
from engine.longlive2.vae import PRESETS as VAE_PRESETS
from engine.longlive2.vae import vae_shapes
from engine.weights import WeightPaths2

DATA = Path(__file__).parent / "data"
# The golden vectors' tiny generator (tests/test_longlive2_engine.py checks it against the reference).
TINY_GENERATOR = next(DATA.glob("longlive2*/model_tiny_fp32.pt"))


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Weights randn/sqrt(fan_in), biases small, norm gains ~1: finite, O(1) activations."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=generator)
        if key.endswith("gamma"):
            t = 1 + 0.1 * t
        elif key.endswith("bias") or len(shape) == 1:
            t = 0.05 * t
        else:
            t = t / math.sqrt(math.prod(shape[1:]))
        state[key] = t
    return state


def write_tiny_vae22(path: Path, seed: int = 0) -> Path:
    """A `Wan2.2_VAE.pth`-layout state dict (encoder + decoder keys) at the tiny width."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_state(vae_shapes(VAE_PRESETS["tiny"]), seed), path)
    return path


def copy_tiny_generator(path: Path) -> Path:
    """The golden tiny generator in LongLive 2.0's `model_bf16.pt` layout ({"generator": {"model.*"}})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY_GENERATOR, path)
    return path


# Engine frame size for the backend tests: latent 2x4 (2 tokens per frame), small enough that the
# VAE decode (the slow part on a CPU) stays cheap; the tiny DiT runs at any multiple of 32.
WIDTH2, HEIGHT2 = 64, 32


def write_tiny_weights2(root: Path, seed: int = 0) -> WeightPaths2:
    """A complete longlive2 weights directory (generator, config, VAE, UMT5, tokenizer) at test size."""
    paths = WeightPaths2(Path(root))
    copy_tiny_generator(paths.base)
    paths.tokenizer.mkdir(parents=True, exist_ok=True)
    tiny = PRESETS["tiny"]
    paths.dit_config.write_text(json.dumps({
        "_class_name": "WanModel", "_diffusers_version": "0.33.0", "model_type": "ti2v",
        "dim": tiny.dim, "eps": tiny.eps, "ffn_dim": tiny.ffn_dim, "freq_dim": tiny.freq_dim,
        "in_dim": tiny.in_dim, "num_heads": tiny.num_heads, "num_layers": tiny.num_layers,
        "out_dim": tiny.out_dim, "text_len": tiny.text_len, "text_dim": tiny.text_dim,
        "patch_size": [1, 2, 2],
    }))
    write_tiny_vae22(paths.vae, seed)
    shutil.copy(DATA / "umt5-tiny" / "umt5_tiny.pth", paths.text_encoder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DATA / "umt5-tiny" / name, paths.tokenizer / name)
    return paths
