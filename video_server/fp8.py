"""FP8 weight storage: leaves stored in float8_e4m3fn, cast to the compute dtype per block, or per leaf.

One SVD-XT UNet step on an H200 (25 frames, 1024x576, guidance batch 2, random weights): FP16 0.63 s,
0.76 with split guidance and forward chunking; FP8 through diffusers' layerwise casting 0.62, but 1.41
with both knobs. Two causes, measured apart:

- Inference tensors (0.63 s of the 0.65 lost). Requests run under `torch.inference_mode`, where a cast
  weight is an inference tensor and stops counting as requiring grad; `matmul` then runs a
  non-contiguous 3-D input (a frame chunk of the temporal feed-forward, diffusers'
  `_chunked_feed_forward`) as a batched product of 5-row matrices against the weight expanded per row
  (bmm), not as one matrix product. Casting outside inference mode: 0.78 s with one cast per leaf call.
- Host work. diffusers' hook runs `module.to()` twice per call of every leaf Linear and convolution,
  and the knobs multiply the calls (two passes a step; each feed-forward Linear once per chunk).
  Casting once per block call: 0.76 s, FP16's time.

`store_fp8` stores the same leaves as diffusers in every mode (the same skip patterns and classes, so
the same bytes) and casts them one of three ways (`Casting`):

- "block" (the denoiser, eager) casts per *unit*: the innermost module above a leaf whose class name
  ends in "Block" (BasicTransformerBlock, TemporalBasicTransformerBlock, SpatioTemporalResBlock,
  CogVideoXBlock, ...), or the leaf itself where no such block holds it. On entry a unit's FP8 tensors'
  `.data` is swapped for compute-dtype copies; on exit, also when the forward raises, the stored FP8
  tensors are put back (no down-cast: FP8 -> FP16/BF16 -> FP8 is exact).
- "layer": diffusers' own per-leaf hooks (the encoders, which run once a request; group offload, where
  a leaf's copy is smaller than a block's; sequential offload, which keeps weights on the meta device
  until each leaf runs).
- "inline" (the denoiser when compiled): each leaf's forward casts its weight and bias as ordinary
  tensor operations and runs the functional op on them (`F.linear`, the convolution), leaving the
  stored tensors alone. torch.compile cannot trace block casting (Dynamo refuses to set `.data` to
  another dtype and breaks the graph at every block); inline casting traces into one graph, where
  inductor fuses each cast into a pointwise kernel before its product and frees the copy after it.
  A non-contiguous Linear input is flattened to one 2-D product first, as matmul does for a weight that
  requires grad, so neither eager nor the traced graph falls into the batched products above.
  Uncompiled (after a failed compile), inline casting computes exactly what block casting does, with
  one cast per leaf call: slower with the knobs on, not wrong.

The hooks sit in diffusers' hook registry under its casting name, so ModelMixin.dtype reports the
compute dtype and the offload hooks added later (model, group) wrap them: a group's weights are on the
device before its blocks cast them, which a plain torch forward pre-hook would not see (it runs before
diffusers' replaced `forward`).

While a unit runs, its FP8 weights also exist in the compute dtype: the plan prices the largest unit
(`largest_unit_params`, vram.plan.Footprint.fp8_cast_params), for inline casting too (the denoiser's
largest block; video_server.footprint says why).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
from diffusers.hooks import HookRegistry, ModelHook, apply_layerwise_casting
from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvTransposeNd

FP8 = torch.float8_e4m3fn
BLOCK_SUFFIX = "Block"
# Embedding tables stay in the compute dtype: transformers models report their first parameter's dtype
# (T5: the token embedding) as theirs, and pipelines compute in that dtype.
SKIP_CLASSES: tuple[type[nn.Module], ...] = (nn.Embedding,)
# diffusers' name for casting hooks; ModelMixin.dtype then reports the hook's compute dtype.
HOOK_NAME = "layerwise_casting"
# How FP8 weights reach the compute dtype (store_fp8): per block, per leaf by diffusers' hooks, or
# inside each leaf's forward.
Casting = Literal["block", "layer", "inline"]


class BlockCastingHook(ModelHook):
    """Runs a casting unit with compute-dtype copies of its FP8 tensors, and puts the FP8 ones back."""

    _is_stateful = False

    def __init__(self, tensors: list[torch.Tensor], compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.tensors = tensors
        self.compute_dtype = compute_dtype

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The unit's forward with its FP8 tensors in the compute dtype (diffusers' ModelHook API)."""
        stored = [t.data for t in self.tensors]
        try:
            with torch.inference_mode(False):  # no inference tensors: see the module docstring
                for tensor, data in zip(self.tensors, stored, strict=True):
                    tensor.data = data.to(self.compute_dtype)
            return self.fn_ref.original_forward(*args, **kwargs)  # type: ignore[misc]  # set on registering
        finally:
            for tensor, data in zip(self.tensors, stored, strict=True):
                tensor.data = data


class InlineCastingHook(ModelHook):
    """Runs a leaf (Linear or convolution) on compute-dtype casts of its weights made in its forward.

    The casts are ordinary tensor operations, which torch.compile traces; the stored FP8 tensors are
    never touched.
    """

    _is_stateful = False

    def __init__(self, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype

    def new_forward(self, module: nn.Module, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The leaf's forward with cast weights (diffusers' ModelHook API); see the module docstring."""
        leaf: Any = module  # a Linear or convolution (fp8_leaves), whose attributes mypy cannot narrow
        weight = leaf.weight.to(self.compute_dtype)
        bias = None if leaf.bias is None else leaf.bias.to(self.compute_dtype)
        if isinstance(module, nn.Linear):
            if input.is_contiguous():
                return F.linear(input, weight, bias)
            # A frame chunk: one 2-D product, as matmul folds it for a weight that requires grad (see the
            # module docstring); a cast weight does not, and would get a batched product per row.
            out = F.linear(input.reshape(-1, input.shape[-1]), weight).view(*input.shape[:-1], -1)
            return out if bias is None else out + bias
        if isinstance(module, _ConvTransposeNd):
            dims = weight.dim() - 2
            output_size = args[0] if args else kwargs.get("output_size")
            padding = leaf._output_padding(
                input, output_size, leaf.stride, leaf.padding, leaf.kernel_size, dims, leaf.dilation
            )
            transposed = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
            return transposed(
                input, weight, bias, leaf.stride, leaf.padding, padding, leaf.groups, leaf.dilation
            )
        return leaf._conv_forward(input, weight, bias)


def skip_patterns(module: nn.Module, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """Module-name patterns kept in the compute dtype: diffusers' defaults, the model's own, and `extra`.

    The model's own are its precision-critical modules (T5 even casts its activations to the dtype of
    `wo`'s weight, which FP8 storage would break).
    """
    own = (
        *(getattr(module, "_skip_layerwise_casting_patterns", None) or ()),
        *(getattr(module, "_keep_in_fp32_modules", None) or ()),
    )
    return (*DEFAULT_SKIP_MODULES_PATTERN, *own, *extra)


def fp8_leaves(module: nn.Module, patterns: Sequence[str], prefix: str = "") -> dict[str, nn.Module]:
    """The leaves FP8 storage covers, by module path: diffusers' `apply_layerwise_casting` selection.

    A module matching a pattern (re.search on its path) or of SKIP_CLASSES is skipped with everything
    below it; Linear and convolution layers are leaves.
    """
    if isinstance(module, SKIP_CLASSES) or any(re.search(p, prefix) for p in patterns):
        return {}
    if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
        return {prefix: module}
    found: dict[str, nn.Module] = {}
    for name, child in module.named_children():
        found |= fp8_leaves(child, patterns, f"{prefix}.{name}" if prefix else name)
    return found


def casting_units(module: nn.Module, leaves: Sequence[str]) -> dict[str, list[str]]:
    """Group leaf paths by the module that casts them: the innermost "...Block" above each, else itself."""
    classes = {name: type(m).__name__ for name, m in module.named_modules()}
    units: dict[str, list[str]] = {}
    for leaf in leaves:
        parts = leaf.split(".")
        above = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        owner = next((name for name in above if classes[name].endswith(BLOCK_SUFFIX)), leaf)
        units.setdefault(owner, []).append(leaf)
    return units


def largest_unit_params(module: nn.Module, casting: Casting) -> int:
    """Parameters of the largest unit FP8 storage casts at once (of a module built on any device)."""
    leaves = fp8_leaves(module, skip_patterns(module))
    units = casting_units(module, list(leaves)) if casting == "block" else {name: [name] for name in leaves}
    sizes = (sum(p.numel() for n in names for p in leaves[n].parameters()) for names in units.values())
    return max(sizes, default=0)


def store_fp8(
    module: nn.Module, compute_dtype: torch.dtype, extra_skip: Sequence[str] = (), casting: Casting = "block"
) -> None:
    """Store `module`'s FP8 leaves in FP8, cast to `compute_dtype` as `casting` says.

    Args:
        module: A diffusers or transformers model, in the compute dtype.
        compute_dtype: The dtype its layers compute in.
        extra_skip: Module-name patterns (relative to `module`) that stay as they are (keep_fp32).
        casting: "block": per casting unit, by swapping tensors (the eager denoiser); "layer":
            diffusers' per-leaf hooks (encoders, which run once per request, and group or sequential
            offload); "inline": inside each leaf's forward, traceable by torch.compile (a compiled
            denoiser).
    """
    patterns = skip_patterns(module, extra_skip)
    if casting == "layer":
        apply_layerwise_casting(
            module,
            storage_dtype=FP8,
            compute_dtype=compute_dtype,
            skip_modules_pattern=patterns,
            skip_modules_classes=SKIP_CLASSES,
        )
        return
    leaves = fp8_leaves(module, patterns)
    if casting == "inline":
        for leaf in leaves.values():
            leaf.to(FP8)
            HookRegistry.check_if_exists_or_initialize(leaf).register_hook(
                InlineCastingHook(compute_dtype), HOOK_NAME
            )
        return
    modules = dict(module.named_modules())
    for owner, names in casting_units(module, list(leaves)).items():
        tensors: list[torch.Tensor] = []
        for name in names:
            leaf = leaves[name].to(FP8)
            tensors += [t for t in (*leaf.parameters(), *leaf.buffers()) if t.dtype == FP8]
        hook = BlockCastingHook(tensors, compute_dtype)
        HookRegistry.check_if_exists_or_initialize(modules[owner]).register_hook(hook, HOOK_NAME)


def traceable(module: nn.Module) -> bool:
    """Whether torch.compile can trace `module`'s FP8 casting: none, or only inline (InlineCastingHook)."""
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook(HOOK_NAME) if isinstance(registry, HookRegistry) else None
        if hook is not None and not isinstance(hook, InlineCastingHook):
            return False
    return True
