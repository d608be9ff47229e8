"""The attention the decode slots use: one query token per sequence, grouped heads, a padding mask.

Registered with transformers' AttentionInterface as "scriptreel". A decoding step (one query token,
the slots' boolean mask) is computed here on the key/value heads directly: the query heads of a group
are stacked against their shared key/value head, so the cache is read once, never repeated per query
head (SDPA with a mask repeats it: 16x the cache traffic for ChatGLM3's 32 query and 2 key/value heads).
Everything else (prefill, unmasked calls) goes to transformers' own SDPA attention.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "scriptreel"
# The eager decode kernel: "sdpa" (PyTorch's memory-efficient kernel) or "matmul" (two products and a
# softmax). Compiled (llm_server.fusion), the matmul kernel becomes a few fused reductions: on an H200,
# a 1 x 1024 step of the 6B GLM took 4.04 ms with it, 5.51 ms with compiled SDPA and 6.11 ms with
# FlexAttention's decoding kernel (bench.decode_profile), which was dropped.
KERNEL = "sdpa"
LOWEST = torch.finfo(torch.float32).min
GROUPED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def slot_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for (batch, heads, 1, dim) queries against the slots; SDPA for anything else.

    Args:
        module: The attention layer.
        query: (batch, heads, query length, head dim).
        key: (batch, key/value heads, keys, head dim); value likewise.
        value: See key.
        attention_mask: (batch, 1, 1, keys) booleans, True where a key is attended to.
        dropout: Only 0 is supported on the decode path (inference).
        scaling: Factor of the scores (head dim ** -0.5 when None).
        kwargs: Passed on to SDPA.

    Returns:
        The output as (batch, query length, heads, head dim), and no attention weights.

    """
    if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool or dropout:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, dim = query.shape
    out = decode(query, key, value, attention_mask, scaling if scaling is not None else dim**-0.5)
    return out.reshape(batch, 1, heads, dim), None


def decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    kernel: str | None = None,
) -> torch.Tensor:
    """One query token per row against the slots; returns (batch, kv heads, group, dim).

    llm_server.fusion may replace this function by its compiled version inside the decode graphs.

    Args:
        query: (batch, heads, 1, head dim).
        key: (batch, key/value heads, keys, head dim).
        value: Like key.
        mask: (batch, 1, 1, keys) booleans, True where a key is attended to.
        scale: Factor of the scores.
        kernel: "sdpa" or "matmul" (default: KERNEL).

    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    if (kernel or KERNEL) == "sdpa":
        with sdpa_kernel(GROUPED_BACKENDS):
            return F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scale)
    scores = torch.matmul(grouped * scale, key.transpose(-1, -2)).float()  # (batch, kv heads, group, keys)
    # The lowest finite score, not -inf: a row with no key (a free slot) gets finite noise, never NaN.
    scores = scores.masked_fill(~mask, LOWEST)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value)  # (batch, kv heads, group, dim)


AttentionInterface.register(NAME, slot_attention)
# Masks are built as for SDPA (without this, transformers builds none for an unknown attention, and a
# prefill chunk after the first would attend as if it started at position 0).
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_slot_attention(model: PreTrainedModel) -> bool:
    """Switch a transformers model from SDPA to this attention; False when it cannot be switched."""
    if model.config._attn_implementation != "sdpa":
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError):
        return False
    return bool(model.config._attn_implementation == NAME)
