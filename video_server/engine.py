"""VideoEngine: one diffusers video pipeline under one precision plan, turning requests into mp4s.

No gRPC here: the servicer turns requests into `VideoParams` and the events `generate` yields into
messages. Generations run one at a time (a diffusers pipeline and its scheduler are not re-entrant);
callers queue on the engine's lock, and a request whose caller gives up while waiting never starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from media.mp4 import encode_mp4
from serving.errors import Cancelled
from video_server import metrics as video_metrics
from video_server.families import Family, VideoDefaults, VideoLimits, detect_family, resolve_limits
from video_server.footprint import ActivationModel, MemoryKnobs, component_sizes, predict_footprint
from video_server.params import Chunk, Progress, Result, VideoEvent, VideoParams, validate_params
from video_server.pipelines import (
    check_encoder_dtype,
    is_compiled,
    load_pipeline,
    release,
    torch_components,
    warm_up,
)
from video_server.planning import resolve_knobs, video_policy, with_vae_note
from video_server.runner import stream_render
from vram import apply, hardware, loader
from vram import metrics as vram_metrics
from vram.monitor import VramMonitor
from vram.plan import Footprint, Hardware, Policy, PrecisionPlan, fallback_chain, resolve_plan

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # mp4 bytes per Chunk event
MIME_TYPE = "video/mp4"
LOCK_POLL_S = 0.05  # how often a request waiting for its turn checks should_stop


@dataclass(frozen=True)
class VideoEngineConfig:
    """Settings of one video engine.

    Attributes:
        model_dir: A diffusers pipeline folder (model_index.json, one folder per component).
        device: "cpu", "cuda", "cuda:N" or "auto".
        policy: The precision policy (precision, keep_fp32, budget, offload, fallback).
        decode_chunk_size: Frames the VAE decodes at once (SVD); 0 picks: 8, or 2 when offloading.
        forward_chunking: Chunk the denoiser's feed-forward (SVD); None: on when offloading.
        vae_tiling: Decode in spatial tiles (CogVideoX); None: on when offloading.
        split_guidance: Run guidance's two halves one after the other; None: on when offloading.
        channels_last: Store the denoiser's and VAE's convolution weights channels-last (CUDA).
        compile: torch.compile the denoiser and the VAE decoder (plans without offload, in FP32, BF16,
            FP16 or FP8, whose weights are then cast inline; video_server.pipelines.compile_modules);
            the warm-up then runs at the default request size, so compilation happens at load.
        upcast_vae: Keep the VAE in FP32 under half precision; None: the family's default (SVD: yes).
        max_width: Largest width served; 0: the folder's scriptreel.json, else the family's.
        max_height: Largest height served; 0 as above.
        max_num_frames: Largest frame count served; 0 as above.
        max_steps: Largest num_inference_steps.
        local_files_only: Never reach the Hugging Face Hub.
        use_safetensors: Load safetensors weights only.
        release_cache_above: After a request, release the allocator's cache above this many bytes.
        min_free: Warn when free device memory under the budget falls below this many bytes.
    """

    model_dir: Path
    device: str = "auto"
    policy: Policy = field(default_factory=Policy)
    decode_chunk_size: int = 0
    forward_chunking: bool | None = None
    vae_tiling: bool | None = None
    split_guidance: bool | None = None
    channels_last: bool = False
    compile: bool = False
    upcast_vae: bool | None = None
    max_width: int = 0
    max_height: int = 0
    max_num_frames: int = 0
    max_steps: int = 200
    local_files_only: bool = True
    use_safetensors: bool = True
    release_cache_above: int = 1 << 30
    min_free: int = 512 << 20


@dataclass
class _Loaded:
    """What `VideoEngine.load` hands to the constructor."""

    config: VideoEngineConfig
    family: Family
    pipe: Any
    plan: PrecisionPlan
    knobs: MemoryKnobs
    hardware: Hardware
    monitor: VramMonitor
    footprint: Footprint
    activations: ActivationModel
    defaults: VideoDefaults
    limits: VideoLimits


class VideoEngine:
    """One loaded video pipeline. Build with `VideoEngine.load`.

    Attributes:
        modality: "image-to-video" or "text-to-video".
        architecture: The pipeline class, e.g. "StableVideoDiffusionPipeline".
        model_name: The model folder's name.
        plan: The precision plan it runs with.
        knobs: decode_chunk_size, forward_chunking and vae_tiling in effect.
        monitor: The VramMonitor of its device (weights_bytes set).
        parameter_count: Parameters of all components.
        defaults: Values of a request's zero fields.
        limits: What a request may ask for.
        device: "cpu" or "cuda:N".
        footprint: The prediction the plan was resolved from.
    """

    def __init__(self, loaded: _Loaded) -> None:
        self.config = loaded.config
        self.family = loaded.family
        self.pipe = loaded.pipe
        self.plan = loaded.plan
        self.knobs = loaded.knobs
        self.hardware = loaded.hardware
        self.device = loaded.hardware.device
        self.monitor = loaded.monitor
        self.footprint = loaded.footprint
        self.defaults = loaded.defaults
        self.limits = loaded.limits
        self.modality = loaded.family.modality
        self.architecture = type(loaded.pipe).__name__
        self.model_name = Path(loaded.config.model_dir).name
        self._activations = loaded.activations
        components = list(torch_components(loaded.pipe).values())
        self.parameter_count = apply.parameter_count(components)
        self.monitor.weights_bytes = apply.weights_bytes(components)
        self._lock = threading.Lock()

    # -- loading --------------------------------------------------------------------------------------
    @classmethod
    def load(cls, config: VideoEngineConfig) -> VideoEngine:
        """Predict, plan, load, warm up.

        Raises:
            vram.plan.PlanError: The folder, policy or knobs cannot be honoured on this device or budget.
            RuntimeError: Every allowed precision failed to load or gave a non-finite warm-up.
        """
        model_dir = Path(config.model_dir)
        family = detect_family(model_dir)
        defaults, limits = resolve_limits(
            model_dir, family, config.max_width, config.max_height, config.max_num_frames, config.max_steps
        )
        hw = hardware.detect(config.device)
        policy = video_policy(config.policy, family, hw, config.upcast_vae)
        relaxed, tight = resolve_knobs(config, family)
        activations = ActivationModel(model_dir, family, vae_fp32=apply.matches("vae", policy.keep_fp32))
        sizes = component_sizes(model_dir, family)
        # The plan must fit the default request; larger ones (up to the limits) are admitted one by
        # one against the memory left (RESOURCE_EXHAUSTED when they do not fit), not refused at start.
        footprint = predict_footprint(
            sizes, activations, family, defaults.width, defaults.height, defaults.num_frames, relaxed, tight
        )
        plan = resolve_plan(footprint, hw, policy)
        if plan.compute_dtype != "float32" and family.encoder in sizes.meta:
            check_encoder_dtype(sizes.meta[family.encoder], family.encoder, plan.keep_fp32)
        log.info("precision plan for %s on %s: %s", model_dir, hw.device, plan.reason)
        monitor = VramMonitor(hw.device, policy.budget_bytes, config.release_cache_above, config.min_free)
        if hw.is_cuda:
            torch.cuda.reset_peak_memory_stats(hw.device)

        def knobs_for(p: PrecisionPlan) -> MemoryKnobs:
            return tight if p.offload != "none" or p.chunked else relaxed

        def on_fallback(failed: PrecisionPlan, why: str) -> None:
            to = fallback_chain(failed, policy, hw)[0]
            vram_metrics.FALLBACKS_TOTAL.labels(failed.precision, to).inc()

        pipe, plan = loader.load_with_fallback(
            lambda p: load_pipeline(
                model_dir,
                p,
                family,
                hw.device,
                knobs_for(p),
                config.use_safetensors,
                config.local_files_only,
                config.channels_last,
                config.compile,
            ),
            lambda pipe: warm_up(
                pipe,
                family,
                defaults.fps,
                defaults.guidance_scale,
                limits.size_multiple,
                limits.frame_multiple,
                hw.device,
                knobs_for(plan),
                (defaults.width, defaults.height, defaults.num_frames) if is_compiled(pipe, family) else None,
            ),
            plan,
            policy,
            hw,
            footprint,
            on_fallback=on_fallback,
            release=release,
        )
        plan = with_vae_note(plan, family)
        engine = cls(
            _Loaded(
                config=config,
                family=family,
                pipe=pipe,
                plan=plan,
                knobs=knobs_for(plan),
                hardware=hw,
                monitor=monitor,
                footprint=footprint,
                activations=activations,
                defaults=defaults,
                limits=limits,
            )
        )
        engine._export_metrics()
        log.info(
            "loaded %s (%s) on %s: %s", engine.model_name, engine.architecture, engine.device, plan.reason
        )
        return engine

    def _export_metrics(self) -> None:
        vram_metrics.MODEL_WEIGHTS_BYTES.labels(self.model_name, self.plan.precision).set(
            self.monitor.weights_bytes
        )
        vram_metrics.MODEL_PARAMETERS.labels(self.model_name).set(self.parameter_count)
        vram_metrics.MODEL_INFO.labels(model=self.model_name, device=self.device, **self.plan.labels()).set(1)
        vram_metrics.PREDICTED_PEAK_BYTES.labels(self.device).set(self.plan.predicted_peak_bytes)
        if self.monitor.is_cuda:
            vram_metrics.LOAD_PEAK_BYTES.labels(self.device).set(torch.cuda.max_memory_allocated(self.device))

    # -- requests -------------------------------------------------------------------------------------
    def validate(self, params: VideoParams) -> VideoParams:
        """Fill defaults and check every field (InvalidArgument lists all violations at once)."""
        return validate_params(params, self.modality, self.defaults, self.limits)

    def predicted_request_bytes(self, params: VideoParams) -> int:
        """Activation bytes a validated request is predicted to need on the device (for admission)."""
        half = self._activations.bytes(
            params.width, params.height, params.num_frames, self.knobs, guidance=params.guidance_scale > 1
        )
        return half * apply.compute_dtype(self.plan).itemsize // 2

    def generate(
        self, params: VideoParams, should_stop: Callable[[], bool]
    ) -> Generator[VideoEvent, None, None]:
        """Render one video, streaming events; a sync generator meant for a worker thread.

        Yields Progress("denoise", i, n) once per step, Progress("decode", 1, 1) and Progress("encode", 1, 1)
        as those stages start, the mp4 as Chunk events of at most 1 MiB, then the Result. Close the
        generator (or let it finish) so the pipeline's thread is joined.

        Raises:
            InvalidArgument: A bad request.
            Cancelled: should_stop() turned true (checked at every step and while waiting for a turn).
            ResourceExhausted: The request does not fit the memory left, or ran out of device memory.
            NonFiniteOutput: NaN or Inf latents or frames (counted in scriptreel_nonfinite_outputs_total).
        """
        params = self.validate(params)
        seed = params.seed or random.SystemRandom().randrange(1, 2**63)
        started = time.perf_counter()
        generator = torch.Generator(self.device).manual_seed(seed)
        with self._turn(should_stop), self.monitor.request(self.predicted_request_bytes(params)) as memory:
            frames = yield from stream_render(
                self.pipe, self.family, params, generator, self.knobs, should_stop
            )
            snapshot = memory()
        if should_stop():
            raise Cancelled("cancelled after decoding")
        yield Progress("encode", 1, 1)
        data = encode_mp4(frames, params.fps)
        video_metrics.GENERATION_SECONDS.observe(time.perf_counter() - started)
        video_metrics.FRAMES_TOTAL.inc(len(frames))
        for offset in range(0, len(data), CHUNK_BYTES):
            yield Chunk(data[offset : offset + CHUNK_BYTES])
        height, width = frames.shape[1:3]
        yield Result(
            mime_type=MIME_TYPE,
            num_frames=len(frames),
            width=width - width % 2,
            height=height - height % 2,
            fps=params.fps,
            sha256=hashlib.sha256(data).hexdigest(),
            duration_seconds=len(frames) / params.fps,
            size_bytes=len(data),
            memory=snapshot,
            seed=seed,
        )

    @contextlib.contextmanager
    def _turn(self, should_stop: Callable[[], bool]) -> Iterator[None]:
        """Hold the pipeline; give up with Cancelled if the caller stops while waiting."""
        while not self._lock.acquire(timeout=LOCK_POLL_S):
            if should_stop():
                raise Cancelled("cancelled while waiting for the pipeline")
        try:
            yield
        finally:
            self._lock.release()
