"""Strict loading of the official DiT checkpoints (engine-spec §2.6).

Formats:
- Wan `diffusion_pytorch_model.safetensors`: DiT keys, no prefix.
- LongLive `longlive_base.pt`: `{"generator": {"model.<key>": tensor}}`.
- LongLive `lora.pt`: `{"generator_lora": PEFT dict, "critic_lora": ..., "step": n}`; only the
  generator adapter is used.

The model is built on the meta device and the weights are assigned (no second copy);
`.pt` files are memory-mapped. Any mismatch is an error naming the file and the keys.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from engine.model import CausalWanModel, ModelConfig, parameter_dtype
from engine.progress import LoadProgress

WRAPPER_PREFIXES = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.",
                    "base_model.model.", "model.")
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
SHOWN = 8  # how many keys an error lists per kind


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded exactly; the message names the file and what is wrong."""


def read_checkpoint(path: str | Path) -> object:
    """A .safetensors or torch checkpoint, memory-mapped where possible; CheckpointError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated?): {exc}") from None
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated?): {exc}") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated?): {exc}") from None
    try:  # legacy (non-zip) pickles cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {exc}") from None


def strip_prefixes(key: str) -> str:
    """Drop wrapper prefixes (`model.`, `_orig_mod.`, FSDP, PEFT) from a parameter name."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _keys(d: dict) -> list[str]:
    """The first top-level keys, printable whatever their types."""
    return sorted(map(repr, d))[:10]


def _tensor_dict(obj: object, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: {what} is not a dict of tensors")
    if not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: {what} has non-string keys")
    return obj


def read_dit_state_dict(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """DiT weights from a Wan safetensors or a LongLive generator checkpoint, prefixes stripped."""
    path = Path(path)
    raw = read_checkpoint(path)
    if isinstance(raw, dict) and any(k in raw for k in ("generator", "generator_ema", "model")):
        if use_ema and "generator_ema" in raw:
            key = "generator_ema"
        elif "generator" in raw:
            key = "generator"
        elif "model" in raw and isinstance(raw["model"], dict):
            key = "model"
        else:
            raise CheckpointError(f"{path}: has {_keys(raw)} but no 'generator' dict")
        state = _tensor_dict(raw[key], path, f"'{key}'")
    elif isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        state = _tensor_dict(raw, path, "the top level")
    else:
        top = _keys(raw) if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: expected DiT tensors or a dict with 'generator'; top level is {top}")
    return {strip_prefixes(k): v for k, v in state.items()}


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                     path: str | Path) -> None:
    """Refuse anything but exactly the expected keys and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} != model {expected[k]}"
             for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if items:
            more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:SHOWN])}{more}")
    raise CheckpointError(f"{path}: does not match the model: " + "; ".join(parts))


def read_lora(path: str | Path, cfg: ModelConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LongLive's generator LoRA as {module name: (A [r, in], B [out, r])}, checked against the model."""
    path = Path(path)
    raw = read_checkpoint(path)
    if not isinstance(raw, dict) or "generator_lora" not in raw:
        top = _keys(raw) if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: expected a dict with 'generator_lora'; top level is {top}")
    state = _tensor_dict(raw["generator_lora"], path, "'generator_lora'")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in state.items():
        match = _LORA_KEY.match(strip_prefixes(key))
        if match is None:
            unexpected.append(key)
            continue
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    targets = {f"blocks.{i}.{t}" for i in range(cfg.num_layers) for t in LORA_TARGETS}
    unexpected += sorted(m for m in pairs if m not in targets)
    missing = sorted(m for m in targets if set(pairs.get(m, {})) != {"A", "B"})
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: generator_lora does not match the model: {len(missing)} missing "
            f"({', '.join(missing[:SHOWN])}), {len(unexpected)} unexpected ({', '.join(unexpected[:SHOWN])})")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CausalWanModel(cfg).state_dict().items()}
    out = {}
    for module in sorted(targets):
        a, b = pairs[module]["A"], pairs[module]["B"]
        out_dim, in_dim = shapes[f"{module}.weight"]
        fits = a.ndim == b.ndim == 2 and a.shape[1] == in_dim and b.shape[0] == out_dim
        if not fits or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{path}: {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                                  f"do not fit a Linear({in_dim}->{out_dim})")
        out[module] = (a, b)
    return out


class LoRALinear(nn.Module):
    """A Linear with an unmerged low-rank adapter: y = W x + b + scale * B (A x) (PEFT semantics)."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(lora_a, requires_grad=False)
        self.lora_B = nn.Parameter(lora_b, requires_grad=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * nn.functional.linear(nn.functional.linear(x, self.lora_A),
                                                                self.lora_B)


def load_dit(cfg: ModelConfig, weights: str | Path, lora: str | Path | None = None, *,
             merge_lora: bool = True, lora_alpha: float | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, use_ema: bool = False,
             progress: LoadProgress | None = None) -> CausalWanModel:
    """Build the DiT on the meta device and assign the checkpoint's weights (plus LongLive's LoRA).

    `lora_alpha` defaults to the rank (LongLive: 256/256, scale 1). Merging is done in fp32
    before the cast: W' = W + (alpha / r) * B @ A. `progress` counts each tensor as it lands.
    """
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = read_dit_state_dict(weights, use_ema=use_ema)
    check_state_dict(state, expected, weights)
    adapters = read_lora(lora, cfg) if lora is not None else {}
    if progress is not None and lora is not None:
        progress.finish(Path(lora))
    scales = {}
    for module, (a, _b) in adapters.items():
        rank = a.shape[0]
        scales[module] = (lora_alpha if lora_alpha is not None else rank) / rank
    # One tensor at a time (merge in fp32, then cast and move), so host memory holds one
    # merged weight at most besides the memory-mapped files.
    for key in list(state):
        module = key.removesuffix(".weight")
        target = parameter_dtype(key, dtype)  # the fp32 islands stay fp32 (model.FP32_PARAMETERS)
        stored = state[key].numel() * state[key].element_size()  # bytes in the file
        if merge_lora and key.endswith(".weight") and module in adapters:
            a, b = adapters[module]
            state[key] = (state[key].float() + scales[module] * (b.float() @ a.float())).to(device, target)
        else:
            state[key] = state[key].to(device=device, dtype=target)
        if progress is not None:
            progress.advance(Path(weights), stored)
    if progress is not None:
        progress.finish(Path(weights))
    model.load_state_dict(state, strict=True, assign=True)
    if adapters and not merge_lora:
        for module, (a, b) in adapters.items():
            parent_name, _, child = module.rpartition(".")
            parent = model.get_submodule(parent_name)
            lora_module = LoRALinear(getattr(parent, child), a.to(device, dtype), b.to(device, dtype),
                                     scales[module])
            setattr(parent, child, lora_module)
    return model.eval().requires_grad_(False)


def config_from_wan_json(path: str | Path, latent_height: int = 60, latent_width: int = 104,
                         model_type: str = "t2v") -> ModelConfig:
    """A ModelConfig from Wan's `config.json` (model_type t2v: Wan2.1; ti2v: Wan2.2-5B) at a latent size."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable config.json: {exc}") from None
    fields = ("dim", "ffn_dim", "freq_dim", "text_len", "in_dim", "out_dim", "num_heads", "num_layers", "eps")
    missing = [f for f in fields if f not in data]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    if data.get("model_type", "t2v") != model_type:
        raise CheckpointError(f"{path}: model_type {data.get('model_type', 't2v')!r}; expected {model_type}")
    kwargs = {f: data[f] for f in fields}
    kwargs["patch_size"] = tuple(data.get("patch_size", (1, 2, 2)))
    kwargs["text_dim"] = data.get("text_dim", 4096)
    return ModelConfig(**kwargs, latent_height=latent_height, latent_width=latent_width)
