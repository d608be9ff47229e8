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


def keep_fp32(model: nn.Module, patterns: Iterable[str], prefix: str = "") -> list[str]:
    """Cast modules whose names match `patterns` to FP32, with casts at their boundaries.

    The module's inputs are cast to FP32 on the way in and its outputs back to the input's dtype
    on the way out (or, when no input was in half precision, e.g. token ids into an embedding, to the
    module's own dtype before the cast), so the rest of the model keeps running in reduced precision.

    Modules whose forward is never called as a unit (ModuleList, ModuleDict, and `model` itself when it
    matches as a whole) cannot carry those casts: they are cast to FP32 and their children get the
    boundary casts instead.

    Args:
        model: The module to patch.
        patterns: Regular expressions, matched with re.search against the module names.
        prefix: The name of `model` itself (e.g. a pipeline component, "vae"): names are then matched as
            "vae.decoder", and the whole model matches as "vae". Without a prefix the whole model
            never matches.

    Returns:
        Names of the modules with FP32 boundaries (outermost matches only), prefixed like the patterns.
    """
    patterns = list(patterns)
    if not patterns:
        return []
    kept: list[str] = []
    containers: set[str] = set()  # cast whole; each child is a boundary
    for name, module in model.named_modules():
        full = ".".join(part for part in (prefix, name) if part)
        if not full or any(full.startswith(k + ".") for k in kept):
            continue
        parent = full.rpartition(".")[0]
        if parent not in containers and not matches(full, patterns):
            continue
        original = next((t.dtype for t in module.parameters() if t.dtype in _HALF), None)
        module.to(torch.float32)
        if not name or isinstance(module, nn.ModuleList | nn.ModuleDict):
            containers.add(full)
            continue
        module._scriptreel_out_dtype = original  # type: ignore[assignment]
        module.register_forward_pre_hook(_upcast_inputs, with_kwargs=True)
        module.register_forward_hook(_downcast_outputs, with_kwargs=True)
        kept.append(full)
    if not kept:
        log.warning("keep_fp32 patterns %s matched no module", patterns)
    return kept


def _cast_tree(value: object, dtype: torch.dtype, from_dtypes: tuple[torch.dtype, ...]) -> object:
    """Cast the tensors in nested tuples, lists and dicts, keeping the containers' types.

    Dict subclasses (transformers' ModelOutput) are updated in place, since their constructors differ.
    """
    if isinstance(value, torch.Tensor) and value.dtype in from_dtypes:
        return value.to(dtype)
    if isinstance(value, tuple):
        items = [_cast_tree(v, dtype, from_dtypes) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)  # type: ignore[arg-type]
    if isinstance(value, list):
        return [_cast_tree(v, dtype, from_dtypes) for v in value]
    if type(value) is dict:
        return {k: _cast_tree(v, dtype, from_dtypes) for k, v in value.items()}
    if isinstance(value, dict):
        for k, v in list(value.items()):
            value[k] = _cast_tree(v, dtype, from_dtypes)
    return value


_HALF = (torch.float16, torch.bfloat16)


def _upcast_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    tensors = [*args, *kwargs.values()]
    dtypes = {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.dtype in _HALF}
    module._scriptreel_in_dtype = dtypes.pop() if dtypes else None  # type: ignore[assignment]
    return _cast_tree(args, torch.float32, _HALF), _cast_tree(kwargs, torch.float32, _HALF)  # type: ignore[return-value]


def _downcast_outputs(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
    dtype = getattr(module, "_scriptreel_in_dtype", None) or getattr(module, "_scriptreel_out_dtype", None)
    return output if dtype is None else _cast_tree(output, dtype, (torch.float32,))


def quantize_linears(
    model: nn.Module, plan: PrecisionPlan, skip: Iterable[str] = (), device: str | None = None
) -> int:
    """Store Linear weights in int8/fp8/int4 through torchao, skipping keep_fp32 and `skip` patterns.

    Args:
        model: The model, on its device, or on the CPU when `device` is given.
        plan: The plan (its precision and keep_fp32 patterns).
        skip: More module-name patterns left unquantized.
        device: When given, each Linear is quantized on the CPU and then moved there, one at a time,
            and the rest of the model follows: the device never holds unquantized weights nor the
            quantization's temporaries, so the load peaks at the quantized size. (int4 is packed for
            its CUDA kernels, so its layers are quantized on the device, one at a time.)

    Returns:
        Number of Linear layers quantized.
    """
    from torchao.quantization import quantize_

    config = _torchao_config(plan.precision)
    patterns = [*plan.keep_fp32, *skip]
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not matches(name, patterns)
    ]
    if device is None:
        wanted = {id(module) for _, module in targets}
        quantize_(model, config, filter_fn=lambda module, fqn: id(module) in wanted)
    else:
        on_device = plan.precision == "int4"
        for _, module in targets:
            if on_device:
                module.to(device)
            quantize_(module, config)
            module.to(device)
        model.to(device)
    return len(targets)


def _torchao_config(precision: str) -> object:
    from torchao.quantization import Float8WeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig

    configs = {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig, "int4": Int4WeightOnlyConfig}
    return configs[precision]()


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
