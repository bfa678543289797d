"""The UMT5-XXL text encoder of Wan2.1 / LongLive, in plain PyTorch (engine-spec §6).

Three parts:

- `UMT5Encoder`: the T5 encoder stack with the parameter names of Wan's
  `models_t5_umt5-xxl-enc-bf16.pth`, so the official file loads without renaming
  (`load_umt5`: memory-mapped, built on the meta device, strict).
- `PromptTokenizer`: the `google/umt5-xxl/` tokenizer folder read offline through the
  `tokenizers` library (its `tokenizer.json`), with Wan's prompt cleaning, padding to
  `text_len`, truncation and the EOS token.
- `TextEncoder`: prompt -> [1, text_len, dim] with an LRU cache keyed by the exact prompt
  text, `prepare()` to encode ahead of a prompt switch, and a "gpu" (resident) or "cpu"
  placement.

Output convention (LongLive's `WanTextEncoder`): rows at and after the real token count
(mask sum, EOS included) are zero.
"""

from __future__ import annotations

import html
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoints import CheckpointError, check_state_dict, read_checkpoint
from engine.progress import LoadProgress

__all__ = [
    "PRESETS",
    "PromptTokenizer",
    "TextEncoder",
    "UMT5Config",
    "UMT5Encoder",
    "clean_prompt",
    "load_umt5",
    "relative_position_buckets",
]


@dataclass(frozen=True)
class UMT5Config:
    """Shape of a (U)MT5 encoder; the defaults are Wan's `umt5_xxl` encoder."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False  # UMT5: one relative-position table per layer
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not a multiple of num_heads {self.num_heads}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"num_buckets must be an even number >= 4, got {self.num_buckets}")

    @property
    def head_dim(self) -> int:
        """Channels per attention head (64 for UMT5-XXL)."""
        return self.dim_attn // self.num_heads

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], text_len: int = 512) -> UMT5Config:
        """The shape a checkpoint was saved with (so test-size and full-size files load alike)."""
        try:
            vocab, dim = state["token_embedding.weight"].shape
            num_buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
            dim_attn = state["blocks.0.attn.q.weight"].shape[0]
            dim_ffn = state["blocks.0.ffn.fc1.weight"].shape[0]
        except KeyError as exc:
            raise ValueError(f"not a UMT5 encoder state dict (no {exc.args[0]})") from None
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        return cls(vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=heads,
                   num_layers=layers, num_buckets=num_buckets, text_len=text_len)

    @classmethod
    def preset(cls, name: str) -> UMT5Config:
        """A named preset: "umt5-xxl" (Wan2.1 / LongLive) or "tiny" (tests)."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown UMT5 preset {name!r}; known: {', '.join(PRESETS)}") from None


PRESETS: dict[str, UMT5Config] = {
    "umt5-xxl": UMT5Config(),
    # The golden-vector size (tests/data/umt5-tiny). dim/text_len match the DiT's tiny preset
    # (text_dim 32, text_len 16); the tiny tokenizer has 86 pieces (the real model also has
    # more embedding rows, 256,384, than its tokenizer has ids).
    "tiny": UMT5Config(vocab=96, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2, text_len=16),
}


def _config(cfg: UMT5Config | str) -> UMT5Config:
    return UMT5Config.preset(cfg) if isinstance(cfg, str) else cfg


# ----------------------------------------------------------------------------- model


def relative_position_buckets(length: int, num_buckets: int = 32, max_distance: int = 128,
                              device: torch.device | str | None = None) -> torch.Tensor:
    """Bidirectional T5 bucket of every (query i, key j) pair, [length, length] int64.

    Half of the buckets are for keys after the query. Within a half, distances below a
    quarter of `num_buckets` get a bucket each; larger ones share log-spaced buckets up to
    `max_distance`, beyond which everything falls in the last bucket.
    """
    pos = torch.arange(length, device=device)
    offset = pos[None, :] - pos[:, None]  # key - query
    half = num_buckets // 2
    exact = half // 2
    dist = offset.abs()
    # Log-spaced bucket for the far distances (computed in fp32 like the reference; the
    # clamp keeps log() finite where the exact bucket is used instead).
    ratio = dist.clamp(min=exact).float() / exact
    far = exact + (torch.log(ratio) / math.log(max_distance / exact) * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return (offset > 0).long() * half + torch.where(dist < exact, dist, far)


class T5RMSNorm(nn.Module):
    """T5LayerNorm: scale by the inverse RMS (fp32), no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * xf.to(self.weight.dtype)


class GELUTanh(nn.Module):
    """GELU with the tanh approximation (no parameters; sits at `ffn.gate.1`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class T5Attention(nn.Module):
    """Multi-head self-attention without the 1/sqrt(d) scaling (T5 folds it into the weights)."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; bias [B, heads, L, L] added to the logits (position bias + key mask)."""
        b, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
                                             attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, length, -1))


class T5FeedForward(nn.Module):
    """Gated GELU: fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), GELUTanh())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5RelativeBias(nn.Module):
    """Learned scalar bias per (bucket, head); `embedding.weight` is [num_buckets, heads]."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets [L, L] -> bias [1, heads, L, L]."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # Same guard as Wan's reference: only fp16 overflows, and only then is it clamped.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5Block(nn.Module):
    """Pre-norm encoder layer: x + attn(norm1(x)), then x + ffn(norm2(x))."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5RMSNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = None if cfg.shared_pos else T5RelativeBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """The UMT5 encoder; `forward(ids, mask)` -> [B, L, dim] with padded rows zeroed.

    Keys: `token_embedding.weight`, `blocks.{i}.{norm1,norm2}.weight`,
    `blocks.{i}.attn.{q,k,v,o}.weight`, `blocks.{i}.ffn.{gate.0,fc1,fc2}.weight`,
    `blocks.{i}.pos_embedding.embedding.weight` (or a top-level `pos_embedding` when
    `shared_pos`), `norm.weight`.
    """

    def __init__(self, cfg: UMT5Config | str = "umt5-xxl"):
        super().__init__()
        cfg = _config(cfg)
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos_embedding = T5RelativeBias(cfg.num_buckets, cfg.num_heads) if cfg.shared_pos else None
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                on_layer: Callable[[], None] | None = None) -> torch.Tensor:
        """ids [B, L] int; mask [B, L] (1 = token, 0 = padding) or None; `on_layer` runs after each layer."""
        b, length = ids.shape
        x = self.token_embedding(ids)
        if mask is None:
            mask = torch.ones_like(ids)
        mask = mask.to(x.device)
        buckets = relative_position_buckets(length, self.cfg.num_buckets, self.cfg.max_distance, x.device)
        padded_key = (mask == 0).view(b, 1, 1, length)
        fill = torch.finfo(x.dtype).min
        shared = self.pos_embedding(buckets) if self.pos_embedding is not None else None
        for block in self.blocks:
            pos = shared if shared is not None else block.pos_embedding(buckets)
            bias = pos.to(x.dtype).expand(b, -1, -1, -1).masked_fill(padded_key, fill)
            x = block(x, bias)
            if on_layer is not None:
                on_layer()  # an XXL encode on a CPU takes many seconds: show it is moving
        x = self.norm(x)
        # LongLive zeroes every row from the real token count on (EOS is a real token).
        count = mask.gt(0).sum(dim=1)
        beyond = torch.arange(length, device=x.device)[None, :] >= count[:, None]
        return x.masked_fill(beyond[..., None], 0.0)


def load_umt5(path: str | Path, cfg: UMT5Config | str = "umt5-xxl", device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.bfloat16, progress: LoadProgress | None = None) -> UMT5Encoder:
    """Build the encoder on the meta device and assign the checkpoint's tensors.

    Reads Wan's `models_t5_umt5-xxl-enc-bf16.pth` (a plain state dict, memory-mapped) or a
    safetensors file with the same key names; each tensor is moved/cast once to
    `device`/`dtype` (no fp32 copy of the XXL model is ever made). Anything but exactly the
    model's keys and shapes raises `CheckpointError` naming the file and the keys.
    """
    cfg = _config(cfg)
    path = Path(path)
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    raw = read_checkpoint(path)
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{path}: expected a state dict of UMT5 tensors, got {type(raw).__name__}")
    bad = sorted(repr(k) for k, v in raw.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path}: not a dict of tensors (entries {', '.join(bad[:8])})")
    check_state_dict(raw, expected, path)
    state = {}
    for key in list(raw):
        # Popped as converted, so a cast never holds the file's copy and the new one at once.
        tensor = raw.pop(key)
        state[key] = tensor.to(device=device, dtype=dtype)
        if progress is not None:
            progress.advance(path, tensor.numel() * tensor.element_size())
        del tensor
    if progress is not None:
        progress.finish(path)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- tokenizer

# Unicode White_Space, which is what `\s` means to the `regex` module Wan's cleaning uses
# (Python's `re` would also match U+001C..U+001F).
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
    """Wan's "whitespace" cleaning: ftfy fix, HTML-unescape twice, strip, collapse whitespace."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def _special(folder: Path, name: str, default: str) -> str:
    """A special token's text from special_tokens_map.json or tokenizer_config.json."""
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        p = folder / file
        if not p.is_file():
            continue
        try:
            value = json.loads(p.read_text(encoding="utf-8")).get(name)
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{p}: not a readable tokenizer file: {exc}") from None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return default


class PromptTokenizer:
    """Prompt -> (ids [B, text_len] int64, mask [B, text_len] int64), as Wan's HuggingfaceTokenizer.

    Cleaning "whitespace"; `padding="max_length"`, `truncation=True`, `add_special_tokens=True`:
    the EOS is appended and survives truncation (the text is cut to text_len - 1 tokens).
    """

    def __init__(self, tokenizer, text_len: int = 512, pad_token: str = "<pad>", eos_token: str = "</s>",
                 source: str | Path = "<tokenizer>"):
        from tokenizers import processors

        self.text_len = text_len
        self.source = str(source)
        pad_id = tokenizer.token_to_id(pad_token)
        eos_id = tokenizer.token_to_id(eos_token)
        if pad_id is None or eos_id is None:
            raise CheckpointError(f"{source}: the vocabulary lacks the pad {pad_token!r} "
                                  f"or EOS {eos_token!r} token")
        if tokenizer.post_processor is None:
            # What transformers' T5 tokenizer installs; the real tokenizer.json already has it.
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"$A {eos_token}", pair=f"$A {eos_token} $B {eos_token}",
                special_tokens=[(eos_token, eos_id)])
        tokenizer.enable_truncation(max_length=text_len, direction="right")
        tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token, length=text_len)
        self._tok = tokenizer
        self.pad_id = pad_id
        self.eos_id = eos_id

    @classmethod
    def from_dir(cls, path: str | Path, text_len: int = 512) -> PromptTokenizer:
        """Read an HF tokenizer folder (Wan's `google/umt5-xxl/`) offline via its `tokenizer.json`."""
        from tokenizers import Tokenizer

        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            if (folder / "spiece.model").is_file():
                raise CheckpointError(f"{file}: not found; only spiece.model is there, which is not "
                                      "supported (Wan's google/umt5-xxl/ folder ships tokenizer.json)")
            raise CheckpointError(f"{file}: not found (expected an HF tokenizer folder)")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise CheckpointError(f"{file}: not a readable tokenizer.json: {exc}") from None
        return cls(tokenizer, text_len, _special(folder, "pad_token", "<pad>"),
                   _special(folder, "eos_token", "</s>"), source=file)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        encodings = self._tok.encode_batch([clean_prompt(p) for p in prompts], add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def tokens(self, prompt: str) -> list[str]:
        """The pieces of a prompt after cleaning (for logs and debugging), padding excluded."""
        enc = self._tok.encode(clean_prompt(prompt), add_special_tokens=True)
        return [t for t, m in zip(enc.tokens, enc.attention_mask, strict=True) if m]


# ----------------------------------------------------------------------------- cached encoder

PLACEMENTS = ("gpu", "cpu")


def default_encoder_dtype(placement: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype UMT5 runs in for a placement: the model dtype on the GPU, fp32 on the CPU."""
    return dtype if placement == "gpu" else torch.float32


class TextEncoder:
    """Prompt -> embedding [1, text_len, dim] on `device`/`dtype`, with an LRU cache.

    The cache is keyed by the exact prompt text (before cleaning) and holds up to
    `cache_size` entries (0 disables it); a hit returns the same tensor object and runs no
    model (`model_calls` counts the runs). Returned tensors are shared: do not modify them.
    They are inference tensors, so an in-place write outside inference mode raises.

    placement "gpu": the encoder stays resident on `device` (11.4 GB bf16 for UMT5-XXL).
    "cpu": the encoder stays on the CPU; only the result is moved to `device` and cast to
    `dtype`. The encoder runs in the dtype it was loaded in (`load_umt5`): it is never
    converted here, so no second copy of a 23 GB model is ever made.
    Thread-safe: one lock serialises cache access and model runs, so `prepare()` can run on
    another thread.
    """

    def __init__(self, encoder: UMT5Encoder, tokenizer: PromptTokenizer, device: str | torch.device = "cuda",
                 dtype: torch.dtype = torch.bfloat16, cache_size: int = 64, placement: str = "gpu",
                 on_layer: Callable[[], None] | None = None):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if tokenizer.text_len != encoder.cfg.text_len:
            raise ValueError(f"tokenizer text_len {tokenizer.text_len} != "
                             f"encoder text_len {encoder.cfg.text_len}")
        if tokenizer.vocab_size > encoder.cfg.vocab:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the encoder only "
                             f"{encoder.cfg.vocab} embeddings")
        self.device = torch.device(device)
        self.dtype = dtype
        self.placement = placement
        self.cache_size = cache_size
        self.tokenizer = tokenizer
        home = self.device if placement == "gpu" else torch.device("cpu")
        weight = encoder.token_embedding.weight
        if weight.device != home:
            raise ValueError(f"placement {placement!r} needs the encoder on {home}, "
                             f"it is on {weight.device}; "
                             "load it there (load_umt5(device=...))")
        self.encoder = encoder.eval().requires_grad_(False)
        self.on_layer = on_layer
        self.model_calls = 0
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_files(cls, weights: str | Path, tokenizer_dir: str | Path, cfg: UMT5Config | str = "umt5-xxl", *,
                   device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                   placement: str = "gpu", cache_size: int = 64, encoder_dtype: torch.dtype | None = None,
                   progress: LoadProgress | None = None,
                   on_layer: Callable[[], None] | None = None) -> TextEncoder:
        """Load the checkpoint straight onto its final device and run dtype, and the tokenizer folder.

        `encoder_dtype` is the dtype the encoder runs in: by default `dtype` on the GPU and fp32
        on the CPU (CPUs without bf16 units are slower and less exact in bf16).
        """
        cfg = _config(cfg)
        home = device if placement == "gpu" else "cpu"
        run_dtype = encoder_dtype or default_encoder_dtype(placement, dtype)
        encoder = load_umt5(weights, cfg, device=home, dtype=run_dtype,
                            progress=progress)
        tokenizer = PromptTokenizer.from_dir(tokenizer_dir, text_len=cfg.text_len)
        return cls(encoder, tokenizer, device=device, dtype=dtype, cache_size=cache_size, placement=placement,
                   on_layer=on_layer)

    @property
    def dim(self) -> int:
        return self.encoder.cfg.dim

    @property
    def text_len(self) -> int:
        return self.encoder.cfg.text_len

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._cache

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def encode(self, prompt: str) -> torch.Tensor:
        """[1, text_len, dim] on `device` in `dtype`; rows past the real tokens are zero."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        with self._lock:
            hit = self._cache.get(prompt)
            if hit is not None:
                self._cache.move_to_end(prompt)
                return hit
            out = self._run(prompt)
            if self.cache_size:
                self._cache[prompt] = out
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return out

    def prepare(self, prompt: str) -> torch.Tensor:
        """Encode ahead of time (e.g. before a prompt switch) so the later `encode` is a cache hit."""
        return self.encode(prompt)

    def _run(self, prompt: str) -> torch.Tensor:
        ids, mask = self.tokenizer(prompt)
        home = self.encoder.token_embedding.weight.device
        with torch.inference_mode():
            out = self.encoder(ids.to(home), mask.to(home), on_layer=self.on_layer)
            out = out.to(device=self.device, dtype=self.dtype)
        self.model_calls += 1
        return out
