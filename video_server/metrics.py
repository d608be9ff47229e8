"""Prometheus metrics of video generation (DESIGN.md section 4: steps and frames for video).

Memory, precision and non-finite counters live in `vram.metrics`; request counts per RPC and status in
the serving layer. These are the engine's own.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

DENOISE_STEP_SECONDS = Histogram(
    "scriptreel_video_denoise_step_seconds",
    "Time of one denoising step (one denoiser forward with guidance, and the scheduler step).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
STEPS_TOTAL = Counter("scriptreel_video_steps_total", "Denoising steps completed.")
FRAMES_TOTAL = Counter("scriptreel_video_frames_total", "Frames of the videos delivered.")
GENERATION_SECONDS = Histogram(
    "scriptreel_video_generation_seconds",
    "Time of a whole generation: conditioning, denoising, decoding and encoding.",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0),
)
