"""One attention function for self and cross attention: FlashAttention when usable, else SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _flash_func():
    try:
        from flash_attn import flash_attn_func  # FlashAttention 2 (3 exposes the same name)
    except ImportError:
        return None
    return flash_attn_func


# Looked up once at import: a call inside a compiled step must be plain attribute access.
FLASH = _flash_func()
LOW_PRECISION = (torch.float16, torch.bfloat16)


def attention_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend `attention` uses for tensors of this device and dtype."""
    usable = torch.device(device).type == "cuda" and dtype in LOW_PRECISION and FLASH is not None
    return "flash-attn" if usable else "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head_dim); tensors are [B, L, heads, head_dim].

    Streaming never masks (the cache holds exactly what a block may see); `mask` (bool
    [Lq, Lk], True = attend) serves the whole-sequence path that checks it.
    """
    if mask is None and FLASH is not None and q.is_cuda and q.dtype in LOW_PRECISION:
        return FLASH(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)
