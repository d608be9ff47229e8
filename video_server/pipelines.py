"""Load a diffusers video pipeline under a precision plan, and render one request with it.

The plan is applied in this order: load in the compute dtype; keep_fp32 islands; quantized storage of the
denoiser and the conditioning encoder (the VAE stays in the compute dtype); placement (device or
offload); activation knobs.

keep_fp32 naming convention: patterns (regular expressions, re.search) are matched against
"<component>.<module path>", e.g. "vae.decoder", "unet.conv_out", "text_encoder.encoder.block.0"; a
pattern matching the bare component name ("^vae$") keeps that whole component in FP32.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from media.keyframe import render_keyframe
from serving.errors import NonFiniteOutput
from video_server.families import SVD, Family
from video_server.footprint import FORWARD_CHUNKS, MemoryKnobs
from video_server.params import VideoParams
from vram import apply
from vram.loader import WarmupFailed
from vram.plan import PlanError, PrecisionPlan

if TYPE_CHECKING:
    from video_server.fp8 import Casting

log = logging.getLogger(__name__)

# torch.compile's backend for the `compile` setting. Tests swap in "eager" (Dynamo's tracing and guards
# without code generation): inductor takes about 80 s to compile the tiny SVD on a 2-core CPU.
COMPILE_BACKEND = "inductor"
# Precisions whose weights compile cannot take: int8/int4 are torchao tensor subclasses. FP8 compiles when
# stored for it (casting="inline", chosen by apply_plan when compiling; video_server.fp8).
UNCOMPILED_PRECISIONS = frozenset({"int8", "int4"})

StepCallback = Callable[[Any, int, Any, dict], dict]


def load_pipeline(
    model_dir: Path,
    plan: PrecisionPlan,
    family: Family,
    device: str,
    knobs: MemoryKnobs,
    use_safetensors: bool = True,
    local_files_only: bool = True,
    channels_last: bool = False,
    compile: bool = False,
) -> Any:
    """Load the pipeline in `model_dir` and apply `plan` and `knobs` to it.

    Returns:
        The DiffusionPipeline, ready to run on `device`.
    """
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        str(model_dir),
        dtype=apply.load_dtype(plan),
        use_safetensors=use_safetensors,
        local_files_only=local_files_only,
    )
    pipe.set_progress_bar_config(disable=True)
    apply_plan(pipe, family, plan, device, knobs, channels_last, compile)
    return pipe


def torch_components(pipe: Any) -> dict[str, nn.Module]:
    """Return the pipeline's torch modules by component name (unet, vae, image_encoder, ...)."""
    return {name: m for name, m in pipe.components.items() if isinstance(m, nn.Module)}


def apply_plan(
    pipe: Any,
    family: Family,
    plan: PrecisionPlan,
    device: str,
    knobs: MemoryKnobs,
    channels_last: bool = False,
    compile: bool = False,
) -> list[str]:
    """Apply precision, placement and activation knobs to a freshly loaded pipeline.

    channels_last stores the denoiser's and the VAE's 4-D (convolution) weights channels-last on CUDA,
    which cuDNN's half-precision convolutions run without layout transposes (measured slower on
    SVD-XT: off by default). compile compiles the denoiser and the VAE decoder (`compile_modules`),
    an FP8 denoiser then stored to be cast inline (`_fp8_casting`).

    Returns:
        Names of the modules kept in FP32 (with their component prefix).
    """
    modules = torch_components(pipe)
    kept: list[str] = []
    for name, module in modules.items():
        kept += _keep_fp32(module, name, plan.keep_fp32)
    if plan.keep_fp32 and not kept:
        log.warning("keep_fp32 patterns %s matched no module of the pipeline", list(plan.keep_fp32))
    if plan.precision in ("fp8", "int8", "int4") and plan.offload == "none":
        pipe.to(device)  # torchao quantizes on the device the weights will run on
    denoiser = modules[family.denoiser]
    for name in (family.denoiser, family.encoder):
        if name in modules and not apply.matches(name, plan.keep_fp32):
            casting = _fp8_casting(name == family.denoiser, plan.offload, compile)
            _store_quantized(modules[name], plan, _relative(kept, name), casting)
    if knobs.split_guidance:
        run_in_halves(denoiser)  # before placement: offload hooks then wrap (and restore) this forward
    _place(pipe, plan.offload, device)
    if knobs.vae_tiling:
        pipe.vae.enable_tiling()
    if channels_last and device.startswith("cuda"):
        for module in (*denoiser.modules(), *pipe.vae.modules()):
            if isinstance(module, nn.Conv2d):
                module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if compile:
        compile_modules(pipe, family, plan)
    return kept


def compile_modules(pipe: Any, family: Family, plan: PrecisionPlan) -> list[str]:
    """Compile the denoiser and the VAE decoder in place with torch.compile, where the plan allows.

    Each module's `nn.Module.compile()`: the pipeline keeps its modules (same classes, attributes and
    state_dict keys; hooks registered on them still run). Compilation happens at the first call of each
    input shape, so the engine warms up at the default request size (see `warm_up`).

    Default mode, not diffusers' suggested mode="reduce-overhead": that mode's CUDA graphs keep a static
    copy of every graph's inputs and outputs and a private memory pool per captured shape, memory the
    plan does not price and a budgeted server cannot spare. dynamic=False: a request's shapes are fixed
    for its whole call, so each size gets kernels specialised to it; another size recompiles (once) on
    the request that first asks for it. Dynamo's recompile limit (8 graphs per forward function, so
    per module class) is left as it is: a default SVD-XT request compiles the UNet once and the decoder
    twice (three chunks of 8 frames, then one of 1); CogVideoX's decoder runs its first frame batch
    without a cache and the others with one, so twice too. Sizes beyond the limit run uncompiled:
    slower, not wrong.

    Skipped, with the reason logged, under offload (the offload hooks move weights between devices
    inside the forward), for INT8 and INT4 (`UNCOMPILED_PRECISIONS`), and for FP8 stored to be cast by
    block (video_server.fp8; apply_plan stores FP8 inline, which compiles, when it is to compile).

    Returns:
        The names of the compiled modules (empty when skipped).
    """
    if plan.offload != "none":
        log.info("compile skipped: the plan offloads (%s); its hooks move weights mid-forward", plan.offload)
        return []
    if plan.precision in UNCOMPILED_PRECISIONS:
        log.info("compile skipped: %s weights are held as torchao tensors", plan.precision)
        return []
    from video_server import fp8

    modules = {family.denoiser: getattr(pipe, family.denoiser), "vae.decoder": pipe.vae.decoder}
    if plan.precision == "fp8" and not all(fp8.traceable(module) for module in modules.values()):
        log.info("compile skipped: fp8 weights are cast per block by hooks that swap tensors mid-forward")
        return []
    for module in modules.values():
        module.compile(backend=COMPILE_BACKEND, dynamic=False)
    log.info("compiled %s with torch.compile (%s backend, default mode)", ", ".join(modules), COMPILE_BACKEND)
    return list(modules)


def is_compiled(pipe: Any, family: Family) -> bool:
    """Whether `compile_modules` compiled this pipeline's denoiser."""
    return getattr(getattr(pipe, family.denoiser), "_compiled_call_impl", None) is not None


def uncompile_modules(pipe: Any, family: Family) -> None:
    """Undo `compile_modules`: the modules run eagerly again (what `nn.Module.compile` set, cleared)."""
    for module in (getattr(pipe, family.denoiser), pipe.vae.decoder):
        module._compiled_call_impl = None


def run_in_halves(module: nn.Module) -> None:
    """Make the denoiser run guidance's batch of two as two passes of one.

    Tensors whose first dimension is the batch are split (conditional and unconditional inputs), the
    outputs concatenated. Compiled, Dynamo skips this wrapper and compiles the denoiser's own forward:
    one graph that both halves run, not both halves traced into one graph of twice the size (the tiny
    SVD's UNet, FP8, chunked feed-forward, inductor on CPU: 63 s to compile instead of 108).
    """
    forward = module.forward

    def halves(*args: Any, **kwargs: Any) -> Any:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        batch = sample.shape[0] if isinstance(sample, torch.Tensor) else 0
        if batch < 2 or batch % 2:
            return forward(*args, **kwargs)
        (args0, kwargs0), (args1, kwargs1) = _split_batch(args, kwargs, batch)
        return _concat(forward(*args0, **kwargs0), forward(*args1, **kwargs1))

    module.forward = torch.compiler.disable(halves, recursive=False)  # type: ignore[method-assign]


@torch.compiler.disable  # so that Dynamo compiles no graph of its own for it (see run_in_halves)
def _split_batch(args: tuple, kwargs: dict[str, Any], batch: int) -> list[tuple[tuple, dict[str, Any]]]:
    """The (args, kwargs) of each half: tensors whose first dimension is `batch` split in two."""

    def half(value: Any, i: int) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
            return value.chunk(2)[i]
        return value

    return [(tuple(half(a, i) for a in args), {k: half(v, i) for k, v in kwargs.items()}) for i in (0, 1)]


@torch.compiler.disable  # as _split_batch
def _concat(first: Any, second: Any) -> Any:
    """Concatenate two outputs of a denoiser (a tensor, a tuple of them, or a diffusers output)."""
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if isinstance(first, tuple):
        return tuple(_concat(a, b) for a, b in zip(first, second, strict=True))
    if isinstance(first, dict):  # diffusers' BaseOutput dataclasses are ordered dicts
        return type(first)(**{k: _concat(v, second[k]) for k, v in first.items()})
    return first


def _keep_fp32(module: nn.Module, name: str, patterns: tuple[str, ...]) -> list[str]:
    """apply.keep_fp32 on one component, only if some pattern matches in it (so it warns only once)."""
    names = (name, *(f"{name}.{sub}" for sub, _ in module.named_modules() if sub))
    if not any(apply.matches(n, patterns) for n in names):
        return []
    return apply.keep_fp32(module, patterns, prefix=name)


def check_encoder_dtype(meta_encoder: nn.Module, name: str, patterns: tuple[str, ...]) -> None:
    """Refuse keep_fp32 patterns that would make the conditioning encoder report FP32 as its dtype.

    Pipelines take their working dtype from the encoder (CogVideoX: `text_encoder.dtype`; SVD: the image
    encoder's first parameter), so the denoiser would then be fed FP32 inputs it cannot take. Checked on
    a meta-device copy before anything is loaded.

    Raises:
        PlanError: With the parameter concerned and what to name instead.
    """
    module = meta_encoder.to(torch.bfloat16)
    _keep_fp32(module, name, patterns)
    first, param = next((n, p) for n, p in module.named_parameters() if p.is_floating_point())
    if param.dtype == torch.float32:
        raise PlanError(
            f"keep_fp32 {list(patterns)} would keep {name}.{first} in FP32; the pipeline takes its working "
            f"dtype from that parameter and would feed the denoiser FP32 inputs. Name modules deeper "
            f"inside {name} (its layers or blocks) instead."
        )


def _relative(kept: list[str], component: str) -> list[str]:
    """keep_fp32 module names inside `component`, as anchored patterns relative to it."""
    prefix = component + "."
    return [f"^{re.escape(k[len(prefix) :])}($|\\.)" for k in kept if k.startswith(prefix)]


def _fp8_casting(denoiser: bool, offload: str, compile: bool) -> Casting:
    """How FP8 storage casts a component's weights (video_server.fp8).

    Only the denoiser runs often enough for per-block casting to pay; compiled (no offload), it casts
    inline, which torch.compile traces. Group and sequential offload are the tightest plans: per-layer
    casting holds one layer's copy instead of a block's (SVD-XT: 13M parameters instead of 52M).
    """
    if not denoiser or offload not in ("none", "model"):
        return "layer"
    return "inline" if compile and offload == "none" else "block"


def _store_quantized(module: nn.Module, plan: PrecisionPlan, skip: list[str], casting: Casting) -> None:
    """FP8 storage (video_server.fp8); int8/int4 through torchao."""
    if plan.precision == "fp8":
        from video_server import fp8

        fp8.store_fp8(module, apply.compute_dtype(plan), skip, casting)
    elif plan.precision in ("int8", "int4"):
        apply.quantize_linears(module, plan, skip=skip)


def _place(pipe: Any, offload: str, device: str) -> None:
    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif offload == "group":
        # The VAE stays on the device: pipelines call its encode/decode, never its forward, so the
        # group hooks of its top-level layers would never load them.
        pipe.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
            exclude_modules=["vae"],
        )
    else:
        raise ValueError(f"unknown offload mode {offload!r}")


def render(
    pipe: Any,
    family: Family,
    params: VideoParams,
    generator: torch.Generator,
    knobs: MemoryKnobs,
    callback: StepCallback,
) -> np.ndarray:
    """Run the pipeline for one validated request.

    Returns:
        The frames as uint8 RGB, shape (num_frames, height, width, 3), converted on the pipeline's
        device (on a GPU, rather than in NumPy on the request's critical path).

    Raises:
        NonFiniteOutput: The decoded frames hold NaN or Inf.
    """
    common: dict[str, Any] = {
        "height": params.height,
        "width": params.width,
        "num_frames": params.num_frames,
        "num_inference_steps": params.num_inference_steps,
        "generator": generator,
        "output_type": "pt",
        "callback_on_step_end": callback,
        "callback_on_step_end_tensor_inputs": ["latents"],
    }
    guidance = params.guidance_scale
    if knobs.forward_chunking:
        chunk = forward_chunk(params.num_frames)
        getattr(pipe, family.denoiser).enable_forward_chunking(chunk_size=chunk)
    if family is SVD:
        output = pipe(
            image=params.conditioning,
            fps=params.fps,
            max_guidance_scale=guidance,
            # SVD ramps guidance from min (first frame) to max (last) and decides on classifier-free
            # guidance twice: from max when encoding the image, from the ramp when denoising. A ramp of
            # one frame is just min, so the two decisions would disagree and the batch sizes mismatch.
            min_guidance_scale=min(1.0, guidance) if params.num_frames > 1 else guidance,
            decode_chunk_size=min(knobs.decode_chunk_size or params.num_frames, params.num_frames),
            **common,
        )
    else:
        output = pipe(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt or None,
            guidance_scale=guidance,
            max_sequence_length=pipe.transformer.config.max_text_seq_length,
            **common,
        )
    frames = to_uint8(output.frames[0])
    expected = (params.num_frames, params.height, params.width, 3)
    if frames.shape != expected:
        raise RuntimeError(f"{type(pipe).__name__} returned frames of shape {frames.shape}, not {expected}")
    return frames


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(frames, 3, height, width) in [0, 1] on any device -> (frames, height, width, 3) uint8 on the host.

    Frame by frame in FP32 (rounding as NumPy would), so the decode phase holds one frame's copy.

    Raises:
        NonFiniteOutput: A value is NaN or Inf (a VAE decode that overflowed).
    """
    if not bool(torch.isfinite(video).all()):
        raise NonFiniteOutput("the pipeline produced NaN/Inf frames (VAE decode)")
    out = torch.empty((video.shape[0], *video.shape[2:], video.shape[1]), dtype=torch.uint8)
    for i, frame in enumerate(video):
        out[i] = frame.float().clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).cpu()
    return out.numpy()


def forward_chunk(num_frames: int) -> int:
    """Frames per feed-forward chunk: the largest divisor of num_frames up to a fifth of it.

    diffusers splits each feed-forward into chunks of this many frames (the spatial blocks' batch is
    guidance batch x frames, the temporal blocks chunk along frames; both must divide evenly). About
    five chunks cut the feed-forward's activations to a fifth: single-frame chunks save little more
    memory and multiply the number of small kernels by the frame count.
    """
    limit = max(1, num_frames // FORWARD_CHUNKS)
    return max(d for d in range(1, limit + 1) if num_frames % d == 0)


def release(pipe: Any) -> None:
    """Drop a pipeline's offload hooks and give its cached device memory back (after a failed warm-up)."""
    with contextlib.suppress(Exception):
        pipe.remove_all_hooks()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def warm_up(
    pipe: Any,
    family: Family,
    fps: int,
    guidance_scale: float,
    size_multiple: int,
    frame_multiple: int,
    device: str,
    knobs: MemoryKnobs,
    size: tuple[int, int, int] | None = None,
) -> None:
    """Run one denoising step; WarmupFailed on NaN/Inf latents or frames.

    `size` is the warm-up request's (width, height, frames). None: a small one (the smallest square of
    at least 32 pixels the size multiple allows, 1 + frame_multiple frames), which checks the plan's
    numerics in a fraction of a request's time. The engine passes its default request size when the
    pipeline is compiled, so that compilation (once per input shape) happens here, at start, rather
    than in the first request; the plan is priced for that size, so the warm-up fits.
    """
    side = max(2 * size_multiple, 32)
    width, height, num_frames = size or (side, side, 1 + frame_multiple)
    image = Image.open(io.BytesIO(render_keyframe("warm-up", width, height, seed=1))).convert("RGB")
    params = VideoParams(
        prompt="warm-up",
        width=width,
        height=height,
        num_frames=num_frames,
        fps=fps,
        num_inference_steps=1,
        guidance_scale=guidance_scale,
        conditioning=image,
    )

    def check(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        if not bool(torch.isfinite(kwargs["latents"]).all()):
            raise WarmupFailed("warm-up produced NaN/Inf latents")
        return kwargs

    with torch.inference_mode():
        try:
            render(pipe, family, params, torch.Generator(device).manual_seed(1), knobs, check)
        except NonFiniteOutput:
            raise WarmupFailed("warm-up produced NaN/Inf frames") from None
        except torch._dynamo.exc.TorchDynamoException:  # compiling failed: a speed setting, not the plan
            if not is_compiled(pipe, family):
                raise
            log.exception("compiling the pipeline failed; it runs uncompiled")
            uncompile_modules(pipe, family)
            warm_up(pipe, family, fps, guidance_scale, size_multiple, frame_multiple, device, knobs)
