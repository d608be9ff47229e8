"""Predict a causal LM's memory from its config alone, before any weight is loaded."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from vram.plan import GRAPH_POOL_WORKSPACE, Footprint

# Bytes per element of the activations as Footprint counts them (a 2-byte compute dtype); the plan
# scales them to the compute dtype's width.
_WIDTH = 2


def _dims(config: PretrainedConfig) -> tuple[int, int, int, int, int, int]:
    """(layers, kv heads, head dim, hidden, intermediate, vocab) of the text model."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    return text.num_hidden_layers, kv_heads, head_dim, text.hidden_size, intermediate, text.vocab_size


def kv_bytes_per_token(config: PretrainedConfig, width: int = _WIDTH) -> int:
    """Bytes of keys and values one token holds in the cache, over all layers."""
    layers, kv_heads, head_dim, *_ = _dims(config)
    return 2 * layers * kv_heads * head_dim * width


def prefill_bytes(config: PretrainedConfig, tokens: int, width: int = _WIDTH) -> int:
    """Transient activations of one prefill of `tokens` tokens (one layer live at a time).

    Counted: a few copies of the hidden states, the fused MLP's intermediate states, queries, keys and
    values, and the float32 logits of the last position. Attention scores are not materialised by the
    SDPA kernels (flash / memory-efficient), so there is no tokens x tokens term.
    """
    _, kv_heads, head_dim, hidden, intermediate, vocab = _dims(config)
    text = config.get_text_config()
    per_token = 4 * hidden + 3 * intermediate + (text.num_attention_heads + 2 * kv_heads) * head_dim
    return tokens * per_token * width + vocab * 4


def request_bytes(config: PretrainedConfig, prompt_tokens: int, prefill_chunk: int, width: int) -> int:
    """Device memory one request adds to the slots reserved at start.

    That is its prompt's own cache while it is prefilled (copied into a slot after), and the
    activations of one prefill chunk.
    """
    chunk = min(prompt_tokens, prefill_chunk)
    return prompt_tokens * kv_bytes_per_token(config, width) + prefill_bytes(config, chunk, width)


def count_parameters(
    config: PretrainedConfig, trust_remote_code: bool = False
) -> tuple[int, int, tuple[tuple[str, int], ...], tuple[str, ...]]:
    """Count the model's parameters, built on the meta device.

    Returns:
        Exact parameters, buffer bytes, per-module parameters, and the modules that are not Linear.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    owners = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    per_module = tuple((n, sum(p.numel() for p in m.parameters(recurse=False))) for n, m in owners)
    not_linear = tuple(n for n, m in owners if not isinstance(m, nn.Linear))
    return params, buffers, per_module, not_linear


def predict_footprint(
    config: PretrainedConfig,
    max_batch_size: int,
    context_tokens: int,
    trust_remote_code: bool = False,
    quantize_skip: tuple[str, ...] = (),
    prefill_chunk: int | None = None,
    cuda_graphs: bool = False,
) -> Footprint:
    """Predict the footprint the precision plan is resolved against.

    Args:
        config: The model's config.
        max_batch_size: Sequences decoded together at most.
        context_tokens: Tokens per sequence at most (prompt + generated).
        trust_remote_code: Whether the config's architecture may come from the model folder.
        quantize_skip: Module-name patterns quantized plans leave in the compute dtype.
        prefill_chunk: Prompt tokens per prefill pass (None: the whole context at once).
        cuda_graphs: Decoding steps replay CUDA graphs (their pool holds a quantized plan's
            dequantized workspace once more: vram.plan.GRAPH_POOL_WORKSPACE).

    Returns:
        Exact parameters and buffers; activations = the decode slots (max_batch_size sequences of
        context_tokens), one prompt's own cache while it is prefilled, and one prefill chunk's
        activations, all at 2 bytes per element.

    """
    params, buffer_bytes, per_module, not_linear = count_parameters(config, trust_remote_code)
    # Quantized plans store Linear weights only: embeddings and norms keep the compute dtype.
    unquantized = (*quantize_skip, *(f"^{re.escape(name)}$" for name in not_linear))
    kv = kv_bytes_per_token(config) * (max_batch_size + 1) * context_tokens
    chunk = min(context_tokens, prefill_chunk or context_tokens)
    dtype = getattr(config, "dtype", None)
    quantized = [
        count
        for name, count in per_module
        if name not in not_linear and not any(re.search(p, name) for p in quantize_skip)
    ]
    return Footprint(
        params=params,
        buffer_bytes=buffer_bytes,
        activation_bytes=kv + prefill_bytes(config, chunk),
        trained_in_bf16=str(dtype).removeprefix("torch.") == "bfloat16",
        module_params=per_module,
        quantize_skip=unquantized,
        largest_linear_params=max(quantized, default=0),
        workspace_copies=1.0 + (GRAPH_POOL_WORKSPACE if cuda_graphs else 0.0),
    )
