"""What the video server adds to a precision policy: the family's FP32 VAE and the activation knobs."""

from __future__ import annotations

import dataclasses
from typing import Protocol

from video_server.families import Family
from video_server.footprint import MemoryKnobs
from vram.backends import torchao_precisions
from vram.plan import PRECISIONS, Hardware, PlanError, Policy, PrecisionPlan

# torchao's int8/int4 weights cannot be offloaded: on an H200, CogVideoX-2b with int8 + model
# offload failed its warm-up with "Attempted to set the storage of a tensor on device cuda:0 to a
# storage on different device cpu" when the offload hooks moved the quantized T5.
UNMOVABLE = frozenset({"int8", "int4"})
VAE_FP32 = "^vae$"  # keep_fp32 pattern of the whole VAE (see video_server.pipelines)
DECODE_CHUNK = 8  # SVD frames decoded at once without offload (the diffusers docs' suggestion)
DECODE_CHUNK_OFFLOADED = 2


class KnobSettings(Protocol):
    """The operator's activation settings (VideoEngineConfig has them)."""

    @property
    def decode_chunk_size(self) -> int:
        """Frames decoded at once; 0: auto."""

    @property
    def forward_chunking(self) -> bool | None:
        """Feed-forward chunking; None: auto."""

    @property
    def vae_tiling(self) -> bool | None:
        """Tiled VAE decoding; None: auto."""

    @property
    def split_guidance(self) -> bool | None:
        """Guidance halves one after the other; None: auto."""


def video_policy(policy: Policy, family: Family, hw: Hardware, upcast_vae: bool | None) -> Policy:
    """Adapt the operator's policy to this pipeline and device.

    Offload only exists on CUDA; the SVD family keeps its VAE in FP32 unless told otherwise (`^vae$` is
    added to keep_fp32, so the plan shows it); FP8 storage needs no extra library, int8/int4 need torchao
    (vram.backends).

    Raises:
        PlanError: An offload mode on a CPU.
    """
    if not hw.is_cuda and policy.offload not in ("auto", "none"):
        raise PlanError(f"offload={policy.offload} needs a CUDA device; on {hw.device} it must be none")
    keep = tuple(policy.keep_fp32)
    if (family.upcast_vae if upcast_vae is None else upcast_vae) and VAE_FP32 not in keep:
        keep = (*keep, VAE_FP32)
    backends = {"fp8"} | (torchao_precisions() - {"fp8"})  # fp8: video_server.fp8's casting
    return dataclasses.replace(
        policy,
        keep_fp32=keep,
        supports_offload=hw.is_cuda,
        quantized_backends=policy.quantized_backends & frozenset(backends),
        offload_precisions=frozenset(PRECISIONS) - UNMOVABLE,
    )


def resolve_knobs(settings: KnobSettings, family: Family) -> tuple[MemoryKnobs, MemoryKnobs]:
    """Resolve the activation knobs without offload and with it.

    Unset knobs follow the offload: on when weights are offloaded (memory is then what is short),
    off otherwise. Explicit settings the family does not have are refused, not ignored.

    Raises:
        PlanError: A knob the family lacks, or a negative decode_chunk_size.
    """
    if settings.decode_chunk_size < 0:
        raise PlanError(f"decode_chunk_size must be 0 (auto) or positive, got {settings.decode_chunk_size}")
    unsupported = [
        name
        for name, asked, supported in (
            ("decode_chunk_size", settings.decode_chunk_size > 0, family.decode_chunks),
            ("forward_chunking", settings.forward_chunking is True, family.forward_chunking),
            ("vae_tiling", settings.vae_tiling is True, family.vae_tiling),
        )
        if asked and not supported
    ]
    if unsupported:
        raise PlanError(f"{', '.join(unsupported)} not supported by {family.pipeline_class} pipelines")

    def knobs(offloaded: bool) -> MemoryKnobs:
        chunk = settings.decode_chunk_size or (DECODE_CHUNK_OFFLOADED if offloaded else DECODE_CHUNK)
        forward = offloaded if settings.forward_chunking is None else settings.forward_chunking
        tiling = offloaded if settings.vae_tiling is None else settings.vae_tiling
        split = offloaded if settings.split_guidance is None else settings.split_guidance
        return MemoryKnobs(
            decode_chunk_size=chunk if family.decode_chunks else 0,
            forward_chunking=forward and family.forward_chunking,
            vae_tiling=tiling and family.vae_tiling,
            split_guidance=split,
        )

    return knobs(False), knobs(True)


def with_vae_note(plan: PrecisionPlan, family: Family) -> PrecisionPlan:
    """Say in the plan's reason that the VAE stays in FP32, where it does and it matters."""
    if VAE_FP32 not in plan.keep_fp32 or plan.compute_dtype == "float32":
        return plan
    why = " (the family decodes in FP32 by default)" if family.upcast_vae else ""
    return dataclasses.replace(plan, reason=f"{plan.reason}; VAE kept in FP32{why}")
