"""Domain objects of the model servers to their protobuf messages (scriptreel.common.v1)."""

from __future__ import annotations

from typing import Protocol

from scriptreel.common.v1 import memory_pb2
from vram.monitor import MemorySnapshot, VramMonitor
from vram.plan import PrecisionPlan


class DescribedEngine(Protocol):
    """What both engines expose for GetModelInfo."""

    model_name: str
    architecture: str
    parameter_count: int
    plan: PrecisionPlan
    monitor: VramMonitor


def memory_pb(snapshot: MemorySnapshot) -> memory_pb2.MemoryStats:
    """MemorySnapshot -> MemoryStats."""
    return memory_pb2.MemoryStats(
        device=snapshot.device,
        weights_bytes=snapshot.weights_bytes,
        allocated_bytes=snapshot.allocated_bytes,
        reserved_bytes=snapshot.reserved_bytes,
        peak_allocated_bytes=snapshot.peak_allocated_bytes,
        device_total_bytes=snapshot.device_total_bytes,
        device_used_bytes=snapshot.device_used_bytes,
        budget_bytes=snapshot.budget_bytes,
    )


def plan_pb(
    plan: PrecisionPlan,
    decode_chunk_size: int = 0,
    forward_chunking: bool = False,
    vae_tiling: bool = False,
    split_guidance: bool = False,
) -> memory_pb2.PrecisionPlan:
    """PrecisionPlan (plus the video knobs) -> PrecisionPlan message."""
    return memory_pb2.PrecisionPlan(
        precision=plan.precision,
        compute_dtype=plan.compute_dtype,
        keep_fp32=list(plan.keep_fp32),
        offload=plan.offload,
        decode_chunk_size=decode_chunk_size,
        forward_chunking=forward_chunking,
        vae_tiling=vae_tiling,
        split_guidance=split_guidance,
        predicted_peak_bytes=plan.predicted_peak_bytes,
        requested=plan.requested,
        reason=plan.reason,
        fallbacks=list(plan.fallbacks),
    )


def model_info_pb(
    engine: DescribedEngine, plan: memory_pb2.PrecisionPlan | None = None
) -> memory_pb2.ModelInfo:
    """The ModelInfo of an engine, with memory figures read now; `plan` overrides the plain plan."""
    return memory_pb2.ModelInfo(
        model=engine.model_name,
        architecture=engine.architecture,
        parameter_count=engine.parameter_count,
        plan=plan if plan is not None else plan_pb(engine.plan),
        memory=memory_pb(engine.monitor.snapshot()),
    )
