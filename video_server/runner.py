"""Run one pipeline call in a helper thread and stream its per-step progress to the caller.

A diffusers pipeline reports steps through `callback_on_step_end`, from inside its own call; a generator
cannot yield from there. So the call runs in a helper thread whose step callback puts events on a queue
that the caller's generator drains. The callback is also where the call is stopped: it raises when the
caller asks to stop (or abandons the generator), which ends the pipeline call at that step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import torch

from serving.errors import Cancelled, NonFiniteOutput
from video_server import metrics as video_metrics
from video_server.families import Family
from video_server.footprint import MemoryKnobs
from video_server.params import Progress, VideoParams
from video_server.pipelines import render
from vram import metrics as vram_metrics

THREAD_NAME = "video-render"


class _Stopped(Exception):
    """Raised from the step callback to end a pipeline call early."""


class StepReporter:
    """The pipeline's step callback: times and counts steps, checks latents, reports progress, stops.

    Args:
        total: Denoising steps of the call.
        should_stop: The caller's wish to stop, checked at the end of every step.
    """

    def __init__(self, total: int, should_stop: Callable[[], bool]) -> None:
        self.total = total
        self.should_stop = should_stop
        self.events: queue.Queue[object] = queue.Queue()
        self.abandoned = threading.Event()
        self._started: float | None = None

    @torch.compiler.disable  # host bookkeeping: a compiled denoiser (the compile setting) runs it as is
    def step_started(self, module: torch.nn.Module, args: tuple) -> None:
        """Forward pre-hook of the denoiser: the first forward of a step starts its clock."""
        if self._started is None:
            self._started = time.perf_counter()

    def __call__(self, pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        """callback_on_step_end: runs after step i (0-based) in the pipeline's thread."""
        if self._started is not None:
            video_metrics.DENOISE_STEP_SECONDS.observe(time.perf_counter() - self._started)
            self._started = None
        video_metrics.STEPS_TOTAL.inc()
        if not bool(torch.isfinite(kwargs["latents"]).all()):
            raise NonFiniteOutput(f"the pipeline produced NaN/Inf latents at step {i + 1} of {self.total}")
        self.events.put(Progress("denoise", i + 1, self.total))
        if i + 1 == self.total:
            self.events.put(Progress("decode", 1, 1))
        if self.should_stop() or self.abandoned.is_set():
            raise _Stopped(f"cancelled after step {i + 1} of {self.total}")
        return kwargs


def stream_render(
    pipe: Any,
    family: Family,
    params: VideoParams,
    generator: torch.Generator,
    knobs: MemoryKnobs,
    should_stop: Callable[[], bool],
) -> Generator[Progress, None, np.ndarray]:
    """Render a validated request in a helper thread, yielding its progress; return its frames.

    The thread is always joined before this generator finishes, including when the caller closes it
    (the pipeline then stops at the end of its current step).

    Raises:
        Cancelled: should_stop() turned true.
        NonFiniteOutput: NaN or Inf latents or frames (counted in scriptreel_nonfinite_outputs_total).
    """
    if should_stop():
        raise Cancelled("cancelled before the first step")
    reporter = StepReporter(params.num_inference_steps, should_stop)
    hook = getattr(pipe, family.denoiser).register_forward_pre_hook(reporter.step_started)

    def work() -> None:
        try:
            with torch.inference_mode():
                reporter.events.put(render(pipe, family, params, generator, knobs, reporter))
        except BaseException as exc:
            reporter.events.put(exc)

    thread = threading.Thread(target=work, name=THREAD_NAME, daemon=True)
    thread.start()
    try:
        while isinstance(item := reporter.events.get(), Progress):
            yield item
    finally:
        reporter.abandoned.set()
        thread.join()
        hook.remove()
    return _frames(item, str(generator.device))


def _frames(outcome: object, device: str) -> np.ndarray:
    """Turn the thread's outcome into frames, or into the exception the caller should see."""
    if isinstance(outcome, _Stopped):
        raise Cancelled(str(outcome)) from None
    if isinstance(outcome, NonFiniteOutput):
        vram_metrics.NONFINITE_TOTAL.labels(device).inc()
        raise outcome
    if isinstance(outcome, BaseException):
        raise outcome
    frames: np.ndarray = outcome  # type: ignore[assignment]  # uint8, checked finite by render
    return frames
