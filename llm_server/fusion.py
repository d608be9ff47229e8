"""Fuse the small kernels of a decoding step with torch.compile, module by module (CUDA graphs only).

A decoding step of a 6B model at batch 1 reads 12 GB of weights in a few large matrix-vector
products, but also runs about fifty small kernels per layer (norms, rotary embeddings, activation,
residuals), each costing a few microseconds even inside a CUDA graph: at 28 layers they take as long
as the weights. Compiling the pieces that hold no state fuses them: each RMSNorm into one kernel, the
MLP's activation into its product, the rotary embedding into one kernel per tensor. Pieces are
compiled once and shared by every layer (the same code, the weights as inputs). The attention and its
cache update stay eager: they are the slots' (llm_server.slots), captured as they are.

The compiled versions run only inside `compiled()`, which llm_server.decode enters while it captures
its graphs: the fused kernels end up in the decode graphs, and everything else (prefill, eager
fallbacks) keeps the eager modules, which run a long prompt faster than the compiled wrappers with
dynamic shapes (measured on the H200: 57.7 ms to the first token of a 512-token prompt with compiled
prefill, 28.3 ms eager).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

NORM_SUFFIX = "RMSNorm"
MLP_SUFFIX = "MLP"
ROPE_FUNCTION = "apply_rotary_pos_emb"
_EAGER_ROPE = f"_eager_{ROPE_FUNCTION}"

_state = threading.local()


@contextlib.contextmanager
def compiled() -> Iterator[None]:
    """Run the fused (compiled) versions in this thread while inside."""
    _state.on = True
    try:
        yield
    finally:
        _state.on = False


def _either(eager: Callable[..., Any], backend: str) -> Callable[..., Any]:
    """A callable running `eager`, or its compiled version (its `fused` attribute) inside compiled()."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        run = forward.fused if getattr(_state, "on", False) else eager  # type: ignore[attr-defined]
        return run(*args, **kwargs)

    forward.fused = torch.compile(eager, dynamic=True, backend=backend)  # type: ignore[attr-defined]
    return forward


def fuse(model: nn.Module, backend: str = "inductor", linears: bool = False, tune: bool = False) -> list[str]:
    """Give the model's norms, MLPs and rotary embedding function compiled versions; returns which.

    The modules' forward methods (and the modeling module's rotary function) are replaced by ones that
    run the compiled version inside `compiled()` and the eager one elsewhere. Compilation happens at
    the first call inside `compiled()`; `unfuse` undoes everything.

    Args:
        model: The causal LM.
        backend: torch.compile's backend ("eager" in tests: dynamo alone, same numbers).
        linears: Also compile every Linear outside the MLPs (attention projections, LM head), so a
            quantized weight is read as stored inside the product instead of dequantized first.
        tune: Coordinate-descent tuning of inductor's kernels (process-wide): a one-row product
            becomes a tuned reduction that reads the weight once at its stored width (what torchao
            sets for its quantized weights, and inductor's own note says matrix-vector products
            need for peak bandwidth). Longer compilation.
    """
    if tune:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    names: set[str] = set()
    inside: set[int] = set()  # modules already inside a compiled piece
    for module in model.modules():
        name = type(module).__name__
        if name.endswith((NORM_SUFFIX, MLP_SUFFIX)):
            module.forward = _either(module.forward, backend)  # type: ignore[method-assign]
            inside.update(id(m) for m in module.modules())
            names.add(name)
    if linears:
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module) not in inside:
                module.forward = _either(module.forward, backend)  # type: ignore[method-assign]
                names.add(type(module).__name__)
    modeling = sys.modules.get(type(model).__module__)
    rope = getattr(modeling, ROPE_FUNCTION, None)
    if modeling is not None and callable(rope) and not hasattr(modeling, _EAGER_ROPE):
        setattr(modeling, _EAGER_ROPE, rope)
        setattr(modeling, ROPE_FUNCTION, _either(rope, backend))
        names.add(f"{modeling.__name__}.{ROPE_FUNCTION}")
    return sorted(names)


def unfuse(model: nn.Module) -> None:
    """Undo `fuse`: the eager forwards and the eager rotary function again."""
    for module in model.modules():
        if hasattr(vars(module).get("forward"), "fused"):
            del module.forward
    modeling: Any = sys.modules.get(type(model).__module__)
    eager = getattr(modeling, _EAGER_ROPE, None)
    if eager is not None:
        setattr(modeling, ROPE_FUNCTION, eager)
        delattr(modeling, _EAGER_ROPE)
