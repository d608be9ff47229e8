"""Memory accounting that acts: gauges, per-request peaks, admission, OOM recovery, cache release.

Two views, never mixed: the process's own (PyTorch caching allocator) and the device's (NVML, all
processes). On a CPU the device gauges read zero with device="cpu"; nothing is invented.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.errors import ResourceExhausted
from vram import metrics
from vram.plan import CUDA_CONTEXT_BYTES
from vram.sizes import format_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemorySnapshot:
    """Memory figures at one moment (fields as in scriptreel.common.v1.MemoryStats)."""

    device: str
    weights_bytes: int = 0
    allocated_bytes: int = 0
    reserved_bytes: int = 0
    peak_allocated_bytes: int = 0
    device_total_bytes: int = 0
    device_used_bytes: int = 0
    budget_bytes: int = 0


def nvml_index(index: int, uuids: Callable[[], list[str]]) -> int:
    """NVML's index of CUDA device `index`: NVML numbers every GPU, CUDA only CUDA_VISIBLE_DEVICES.

    Args:
        index: The CUDA (torch) device index.
        uuids: NVML's device UUIDs ("GPU-..."), in NVML's order (read only for UUID entries).
    """
    visible = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    if "CUDA_VISIBLE_DEVICES" not in os.environ or index >= len(visible):
        return index
    entry = visible[index]
    if entry.isdigit():
        return int(entry)
    for i, uuid in enumerate(uuids()):
        if uuid.startswith(entry) or uuid.startswith("GPU-" + entry):
            return i
    raise LookupError(f"CUDA_VISIBLE_DEVICES entry {entry!r} names no GPU NVML knows")


def nvml_handle(index: int) -> Any:
    """An initialised NVML handle of CUDA device `index` (honours CUDA_VISIBLE_DEVICES)."""
    import pynvml

    pynvml.nvmlInit()

    def uuids() -> list[str]:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            found.append(uuid.decode() if isinstance(uuid, bytes) else uuid)
        return found

    return pynvml.nvmlDeviceGetHandleByIndex(nvml_index(index, uuids))


class Nvml:
    """Device-wide figures through nvidia-ml-py; absent (None) where NVML is not available."""

    def __init__(self, index: int) -> None:
        self._handle = None
        try:
            import pynvml

            self._handle = nvml_handle(index)
            self._pynvml = pynvml
        except Exception as exc:
            log.info("NVML not available (%s); device-wide gauges read zero", exc)

    def memory(self) -> tuple[int, int]:
        """(total, used) bytes of the whole device, or (0, 0) without NVML."""
        if self._handle is None:
            return 0, 0
        info = self._pynvml.nvmlDeviceGetMemoryInfo(self._handle)
        return int(info.total), int(info.used)


class VramMonitor:
    """Watches one device for one server.

    Args:
        device: "cpu" or "cuda:N".
        budget_bytes: Hard cap for this process (None: whole device), CUDA context included: the
            allocator is capped (torch.cuda.set_per_process_memory_fraction) to the budget minus
            vram.plan.CUDA_CONTEXT_BYTES, so it refuses to grow past it, and budgets that add up to a
            card fit on that card.
        release_above_bytes: After a request, release the allocator's cache when it holds more than this.
        min_free_bytes: Warn (log + gauge) when free memory under the budget falls below this.
    """

    def __init__(
        self,
        device: str,
        budget_bytes: int | None = None,
        release_above_bytes: int = 1 << 30,
        min_free_bytes: int = 512 << 20,
    ) -> None:
        self.device = device
        self.budget_bytes = budget_bytes
        self.release_above_bytes = release_above_bytes
        self.min_free_bytes = min_free_bytes
        self.weights_bytes = 0
        self._lock = threading.Lock()
        self._active = 0
        self.is_cuda = device.startswith("cuda")
        self.index = torch.device(device).index or 0 if self.is_cuda else 0
        self.nvml = Nvml(self.index) if self.is_cuda else None
        self.allocator_limit = 0
        if self.is_cuda and budget_bytes:
            total = torch.cuda.get_device_properties(self.index).total_memory
            self.allocator_limit = max(0, budget_bytes - CUDA_CONTEXT_BYTES)
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.allocator_limit / total), self.index)
            log.info(
                "memory budget %s applied to %s (%s for tensors, the rest for the CUDA context)",
                format_bytes(budget_bytes),
                device,
                format_bytes(self.allocator_limit),
            )

    # -- figures ---------------------------------------------------------------------------------
    def snapshot(self, peak_bytes: int | None = None) -> MemorySnapshot:
        """Current figures; `peak_bytes` overrides the since-start peak (for a request's peak)."""
        if not self.is_cuda:
            return MemorySnapshot(self.device, self.weights_bytes, budget_bytes=self.budget_bytes or 0)
        total, used = self.nvml.memory() if self.nvml else (0, 0)
        return MemorySnapshot(
            device=self.device,
            weights_bytes=self.weights_bytes,
            allocated_bytes=torch.cuda.memory_allocated(self.index),
            reserved_bytes=torch.cuda.memory_reserved(self.index),
            peak_allocated_bytes=(
                peak_bytes if peak_bytes is not None else torch.cuda.max_memory_allocated(self.index)
            ),
            device_total_bytes=total,
            device_used_bytes=used,
            budget_bytes=self.budget_bytes or 0,
        )

    def free_bytes(self) -> int | None:
        """Bytes this process may still allocate (budget or device), or None on CPU."""
        if not self.is_cuda:
            return None
        free_device, total = torch.cuda.mem_get_info(self.index)
        reserved = torch.cuda.memory_reserved(self.index)
        allocated = torch.cuda.memory_allocated(self.index)
        cached = reserved - allocated  # reusable without asking the device
        limit = self.allocator_limit or total
        return max(0, min(limit - allocated, free_device + cached))

    # -- acting ----------------------------------------------------------------------------------
    def admit(self, predicted_bytes: int) -> None:
        """Refuse work whose predicted extra memory does not fit what is left (RESOURCE_EXHAUSTED)."""
        free = self.free_bytes()
        if free is None or predicted_bytes <= free:
            return
        metrics.ADMISSION_REJECTED_TOTAL.labels(self.device).inc()
        raise ResourceExhausted(
            f"request needs about {format_bytes(predicted_bytes)} of device memory; "
            f"{format_bytes(free)} is free under the budget",
            retry_after_s=2.0,
        )

    @contextlib.contextmanager
    def request(self, predicted_bytes: int = 0) -> Iterator[Callable[[], MemorySnapshot]]:
        """Scope one request: admission, peak measurement, OOM recovery and cache release.

        Yields a function that returns the snapshot with this request's peak so far.
        CUDA OOM inside the scope is answered as ResourceExhausted and the cache is released.
        """
        self.admit(predicted_bytes)
        with self._lock:
            # The allocator has one peak counter: reset it only when no other request is running, so
            # concurrent (batched) requests never erase each other's peak. A request's peak is then the
            # peak since the oldest request it overlapped began: an upper bound, never an underestimate.
            if self.is_cuda and self._active == 0:
                torch.cuda.reset_peak_memory_stats(self.index)
            self._active += 1
        try:
            yield lambda: self.snapshot(self._peak())
        except torch.OutOfMemoryError as exc:
            metrics.CUDA_OOM_TOTAL.labels(self.device).inc()
            log.warning("CUDA out of memory in a request; cache released: %s", str(exc).splitlines()[0])
            self.release_cache(force=True)
            raise ResourceExhausted("out of GPU memory for this request", retry_after_s=5.0) from None
        finally:
            with self._lock:
                self._active -= 1
            if self.is_cuda:
                metrics.REQUEST_PEAK_BYTES.labels(self.device).observe(self._peak())
                self.release_cache()
                self._check_low_memory()

    def _peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.index) if self.is_cuda else 0

    def release_cache(self, force: bool = False) -> None:
        """Give cached blocks back to the device when the cache exceeds its threshold (or always)."""
        if not self.is_cuda:
            return
        cached = torch.cuda.memory_reserved(self.index) - torch.cuda.memory_allocated(self.index)
        if force or cached > self.release_above_bytes:
            torch.cuda.empty_cache()
            metrics.CACHE_RELEASES_TOTAL.labels(self.device).inc()

    def _check_low_memory(self) -> None:
        free = self.free_bytes()
        low = free is not None and free < self.min_free_bytes
        metrics.LOW_MEMORY.labels(self.device).set(1 if low else 0)
        if low:
            log.warning(
                "free memory %s under the minimum %s",
                format_bytes(free or 0),
                format_bytes(self.min_free_bytes),
            )

    def register_gauges(self) -> None:
        """Export live allocator and NVML figures at every scrape."""
        REGISTRY.register(DeviceMemoryCollector(self))


class DeviceMemoryCollector(Collector):
    """Reads the monitor's figures when Prometheus scrapes."""

    def __init__(self, monitor: VramMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the scriptreel_gpu_memory_* gauges."""
        snap = self.monitor.snapshot()
        figures = {
            "allocated": (snap.allocated_bytes, "PyTorch allocator: bytes in live tensors."),
            "reserved": (snap.reserved_bytes, "PyTorch allocator: bytes reserved (live + cached)."),
            "peak": (snap.peak_allocated_bytes, "PyTorch allocator: peak allocated bytes since start."),
            "total": (snap.device_total_bytes, "NVML: total bytes of the device."),
            "used": (snap.device_used_bytes, "NVML: bytes used on the device by all processes."),
            "budget": (snap.budget_bytes, "This process's memory budget (0: whole device)."),
        }
        for name, (value, doc) in figures.items():
            family = GaugeMetricFamily(f"scriptreel_gpu_memory_{name}_bytes", doc, labels=["device"])
            family.add_metric([snap.device], value)
            yield family
