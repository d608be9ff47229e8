"""What every benchmark records: the GPU, the date, the command; and the process's device memory."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def header() -> dict[str, Any]:
    """{"gpu", "date", "command"} plus the software versions."""
    import diffusers
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no GPU)"
    return {
        "gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "command": "python -m " + " ".join(shlex.quote(a) for a in [_module(), *sys.argv[1:]]),
        "commit": _commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
    }


def _commit() -> str:
    """The commit measured: $SCRIPTREEL_COMMIT (for copies without .git), else git's."""
    if commit := os.environ.get("SCRIPTREEL_COMMIT"):
        return commit
    try:
        git = ["git", "rev-parse", "--short", "HEAD"]
        done = subprocess.run(git, capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def _module() -> str:
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return spec.name if spec else Path(sys.argv[0]).stem


class ProcessMemory:
    """The process's whole device footprint: allocator reserved plus what lies outside it.

    The CUDA context and library handles live outside PyTorch's allocator; NVML sees them. Construct
    this before anything touches CUDA: it reads the device's used memory as the baseline of others.
    """

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self._nvml = None
        self.baseline = 0
        if self.cuda:
            from serving.model_main import configure_allocator
            from vram.monitor import nvml_handle

            configure_allocator()  # as the servers do
            self._nvml = nvml_handle(0)
            self.baseline = self._used()

    def _used(self) -> int:
        import pynvml

        return int(pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used)

    def outside_allocator(self) -> int:
        """Bytes this process holds on the device outside PyTorch's allocator (context, handles)."""
        if not self.cuda:
            return 0
        return max(0, self._used() - self.baseline - torch.cuda.memory_reserved())

    def reset_peak(self) -> None:
        """Start a new peak window."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> dict[str, int]:
        """Peaks of the window.

        measured_peak_bytes is the peak of live tensors plus what the process holds outside the
        allocator: the memory the work needs. The allocator's reserved peak is reported beside it; it
        also counts freed blocks kept in the cache, which an allocator under a budget gives back.
        """
        if not self.cuda:
            return {"peak_allocated_bytes": 0, "peak_reserved_bytes": 0, "measured_peak_bytes": 0}
        torch.cuda.synchronize()
        allocated = torch.cuda.max_memory_allocated()
        outside = self.outside_allocator()
        return {
            "peak_allocated_bytes": allocated,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
            "outside_allocator_bytes": outside,
            "measured_peak_bytes": allocated + outside,
        }


def inductor_kernels() -> list[dict[str, Any]]:
    """Every inductor kernel in this process, with its launch configuration and how it was chosen.

    `autotune_cache` says whether the configuration came from inductor's autotune cache ("hit") or
    was tuned here ("miss"); `coordesc_ms` holds what coordinate-descent tuning measured for the
    configurations it tried, fastest first.
    """
    import gc

    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    found = []
    for kernel in gc.get_objects():
        if not issubclass(type(kernel), CachingAutotuner) or not kernel.launchers:  # type(), not a proxy
            continue
        config = kernel.launchers[0].config
        tuner = getattr(kernel, "coordesc_tuner", None)
        tried = tuner.cached_benchmark_results.items() if tuner is not None else []
        found.append(
            {
                "kernel": kernel.fn.__name__,
                "size_hints": dict(kernel.size_hints or {}),
                "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
                "autotune_cache": (getattr(kernel, "autotune_cache_info", None) or {}).get(
                    "autotune_cache_state"
                ),
                "coordesc_ms": sorted([round(ms, 4), str(c)] for c, ms in tried)[:6],
            }
        )
    return sorted(found, key=lambda k: str(k["size_hints"]))


RESULT_TAG = "RESULT "  # starts the line on which a child process reports its record


def child_job(
    module: str, flag: str, job: dict[str, Any], env: dict[str, str], timeout: float
) -> dict[str, Any]:
    """Run `python -m module flag JSON(job)` in a child process (bounded in time; its device memory goes
    with it) and return the record it `report`s, or {"error": what went wrong}."""
    command = [sys.executable, "-m", module, flag, json.dumps(job)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"TimeoutExpired: the child process took more than {timeout:.0f}s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if lines:
        return json.loads(lines[-1].removeprefix(RESULT_TAG))  # type: ignore[no-any-return]
    return {"error": f"exit code {done.returncode}:\n{done.stderr[-2500:]}"}


def report(record: dict[str, Any]) -> None:
    """Hand a child process's record to `child_job` in the parent (on stdout)."""
    print(RESULT_TAG + json.dumps(record), flush=True)


def write(path: Path, data: dict[str, Any]) -> None:
    """Write the results JSON (pretty, stable key order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
