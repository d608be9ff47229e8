"""Apply a PrecisionPlan to loaded torch modules: dtypes, FP32 islands, quantized storage."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from vram.plan import PrecisionPlan

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def compute_dtype(plan: PrecisionPlan) -> torch.dtype:
    """The torch dtype activations are computed in."""
    return DTYPES[plan.compute_dtype]


def load_dtype(plan: PrecisionPlan) -> torch.dtype:
    """The dtype to pass to from_pretrained: the compute dtype (quantization happens after)."""
    return compute_dtype(plan)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a module name matches any keep_fp32 pattern (re.search)."""
    return any(re.search(p, name) for p in patterns)


def keep_fp32(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Cast modules whose names match `patterns` to FP32, with casts at their boundaries.

    The module's inputs are cast to FP32 on the way in and its outputs back to the input's dtype
    on the way out, so the rest of the model keeps running in reduced precision.

    Returns:
        Names of the modules kept in FP32 (outermost matches only).
    """
    patterns = list(patterns)
    if not patterns:
        return []
    kept: list[str] = []
    for name, module in model.named_modules():
        if not name or not matches(name, patterns) or any(name.startswith(k + ".") for k in kept):
            continue
        module.to(torch.float32)
        module.register_forward_pre_hook(_upcast_inputs, with_kwargs=True)
        module.register_forward_hook(_downcast_outputs, with_kwargs=True)
        kept.append(name)
    if not kept:
        log.warning("keep_fp32 patterns %s matched no module", patterns)
    return kept


def _cast_tree(value: object, dtype: torch.dtype, from_dtypes: tuple[torch.dtype, ...]) -> object:
    if isinstance(value, torch.Tensor) and value.dtype in from_dtypes:
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast_tree(v, dtype, from_dtypes) for v in value)
    if isinstance(value, list):
        return [_cast_tree(v, dtype, from_dtypes) for v in value]
    if isinstance(value, dict):
        return {k: _cast_tree(v, dtype, from_dtypes) for k, v in value.items()}
    return value


_HALF = (torch.float16, torch.bfloat16)


def _upcast_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    dtypes = {t.dtype for t in args if isinstance(t, torch.Tensor) and t.dtype in _HALF}
    module._scriptreel_in_dtype = dtypes.pop() if dtypes else None  # type: ignore[assignment]
    return _cast_tree(args, torch.float32, _HALF), _cast_tree(kwargs, torch.float32, _HALF)  # type: ignore[return-value]


def _downcast_outputs(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
    dtype = getattr(module, "_scriptreel_in_dtype", None)
    return output if dtype is None else _cast_tree(output, dtype, (torch.float32,))


def quantize_linears(model: nn.Module, plan: PrecisionPlan, skip: Iterable[str] = ()) -> int:
    """Store Linear weights in int8/fp8/int4 through torchao, skipping keep_fp32 and `skip` patterns.

    Returns:
        Number of Linear layers quantized.
    """
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    configs = {
        "int8": Int8WeightOnlyConfig,
        "fp8": Float8WeightOnlyConfig,
        "int4": Int4WeightOnlyConfig,
    }
    patterns = [*plan.keep_fp32, *skip]
    count = 0

    def wanted(module: nn.Module, fqn: str) -> bool:
        nonlocal count
        ok = isinstance(module, nn.Linear) and not matches(fqn, patterns)
        count += ok
        return ok

    quantize_(model, configs[plan.precision](), filter_fn=wanted)
    return count


def weights_bytes(modules: Iterable[nn.Module]) -> int:
    """Exact bytes of all parameters and buffers of the modules, as stored (quantized included)."""
    total = 0
    seen: set[int] = set()
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor stores; for torchao's tensor subclasses, the sum of their inner tensors."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n) is not None)
    return tensor.numel() * tensor.element_size()


def parameter_count(modules: Iterable[nn.Module]) -> int:
    """Number of parameters (logical elements, whatever the storage)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when no tensor holds NaN or Inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)
