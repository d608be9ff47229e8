"""Fuse the small kernels of a decoding step with torch.compile, module by module (CUDA only).

A decoding step of a 6B model at batch 1 reads 12 GB of weights in a few large matrix-vector
products, but also runs about fifty small kernels per layer (norms, rotary embeddings, activation,
residuals), each costing a few microseconds even inside a CUDA graph: at 28 layers they take as long
as the weights. Compiling the pieces that hold no state fuses them: each RMSNorm into one kernel, the
MLP's activation into its product, the rotary embedding into one kernel per tensor. Pieces are
compiled once and shared by every layer (the same code, the weights as inputs). The attention and its
cache update stay eager: they are the slots' (llm_server.slots), captured as they are.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

NORM_SUFFIX = "RMSNorm"
MLP_SUFFIX = "MLP"
ROPE_FUNCTION = "apply_rotary_pos_emb"


def fuse(model: nn.Module) -> list[str]:
    """Compile the model's norms, MLPs and rotary embedding function; returns what was compiled.

    The compiled callables replace the modules' forward methods (and the modeling module's rotary
    function), so the model runs them in prefill and decode alike; the caller checks one forward pass
    and calls `unfuse` if it fails.
    """
    compiled: set[str] = set()
    for module in model.modules():
        name = type(module).__name__
        if name.endswith((NORM_SUFFIX, MLP_SUFFIX)):
            module.forward = torch.compile(module.forward, dynamic=True)  # type: ignore[method-assign]
            compiled.add(name)
    modeling = sys.modules.get(type(model).__module__)
    rope = getattr(modeling, ROPE_FUNCTION, None)
    if modeling is not None and callable(rope) and not hasattr(rope, "_torchdynamo_orig_callable"):
        setattr(modeling, f"_eager_{ROPE_FUNCTION}", rope)
        setattr(modeling, ROPE_FUNCTION, torch.compile(rope, dynamic=True))
        compiled.add(f"{modeling.__name__}.{ROPE_FUNCTION}")
    return sorted(compiled)


def unfuse(model: nn.Module) -> None:
    """Undo `fuse`: eager forwards and the eager rotary function again."""
    for module in model.modules():
        if "forward" in vars(module):
            del module.forward
    modeling: Any = sys.modules.get(type(model).__module__)
    eager = getattr(modeling, f"_eager_{ROPE_FUNCTION}", None)
    if eager is not None:
        setattr(modeling, ROPE_FUNCTION, eager)
