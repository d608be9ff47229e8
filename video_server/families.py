"""The pipeline families the video server runs, and the request defaults and limits of a model folder.

A family is recognised from `model_index.json`'s `_class_name`, before anything is loaded. Its request
defaults are the published ones of its reference checkpoint; a folder's `scriptreel.json` (written by
`tiny_models` for its tiny pipelines) overrides them, and the server's settings override the maxima.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from vram.plan import PlanError

log = logging.getLogger(__name__)

SIDECAR = "scriptreel.json"
MAX_FPS = 60
MAX_PROMPT_CHARS = 2000
MAX_STEPS = 200
# Smallest width and height served: at 8 pixels an SVD latent is a single cell, which the tiny SVD's
# group norms (one channel per group) cannot normalise. Rounded up to the size multiple.
MIN_SIZE = 16
COGVIDEOX_LATENT_BATCH = 2


@dataclass(frozen=True)
class VideoDefaults:
    """Values a request's zero fields take (GetModelInfoResponse.default_*)."""

    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float


@dataclass(frozen=True)
class VideoLimits:
    """What a request may ask for (GetModelInfoResponse.size_multiple and max_*).

    Attributes:
        size_multiple: Width and height are multiples of this (the VAE's spatial factor, times the
            transformer's patch size where there is one).
        max_width: Largest width.
        max_height: Largest height.
        max_num_frames: Largest frame count.
        frame_multiple: num_frames - 1 is a multiple of this (CogVideoX: 8, twice its VAE's temporal
            factor); 1 means any count.
        max_steps: Largest num_inference_steps.
        max_fps: Largest fps.
        max_prompt_chars: Longest prompt and negative prompt.
        min_size: Smallest width and height (MIN_SIZE rounded up to size_multiple).
    """

    size_multiple: int
    max_width: int
    max_height: int
    max_num_frames: int
    frame_multiple: int = 1
    max_steps: int = MAX_STEPS
    max_fps: int = MAX_FPS
    max_prompt_chars: int = MAX_PROMPT_CHARS
    min_size: int = MIN_SIZE


@dataclass(frozen=True)
class Family:
    """What the engine needs to know of one kind of diffusers video pipeline.

    Attributes:
        name: Short name ("svd", "cogvideox").
        pipeline_class: The diffusers pipeline class name in model_index.json.
        modality: "image-to-video" or "text-to-video".
        denoiser: Component that runs every step ("unet", "transformer").
        encoder: The conditioning encoder ("image_encoder", "text_encoder").
        defaults: Request defaults of the reference checkpoint.
        max_width: Largest width served by default.
        max_height: Largest height served by default.
        max_num_frames: Largest frame count served by default.
        upcast_vae: Keep the VAE in FP32 under half precision by default. Off for SVD, whose
            reference checkpoint decodes in FP16 (its published fp16 variant); the warm-up probe still
            falls back if a checkpoint's decode is not finite, and `keep_fp32=vae` forces it.
        forward_chunking: The denoiser supports feed-forward chunking.
        vae_tiling: The VAE supports tiled decoding.
        decode_chunks: The pipeline decodes `decode_chunk_size` frames at a time.
    """

    name: str
    pipeline_class: str
    modality: str
    denoiser: str
    encoder: str
    defaults: VideoDefaults
    max_width: int
    max_height: int
    max_num_frames: int
    upcast_vae: bool = False
    forward_chunking: bool = False
    vae_tiling: bool = False
    decode_chunks: bool = False


SVD = Family(
    name="svd",
    pipeline_class="StableVideoDiffusionPipeline",
    modality="image-to-video",
    denoiser="unet",
    encoder="image_encoder",
    defaults=VideoDefaults(
        width=1024, height=576, num_frames=25, fps=7, num_inference_steps=25, guidance_scale=3.0
    ),
    max_width=1024,
    max_height=1024,
    max_num_frames=25,
    forward_chunking=True,
    decode_chunks=True,
)
COGVIDEOX = Family(
    name="cogvideox",
    pipeline_class="CogVideoXPipeline",
    modality="text-to-video",
    denoiser="transformer",
    encoder="text_encoder",
    defaults=VideoDefaults(
        width=720, height=480, num_frames=49, fps=8, num_inference_steps=50, guidance_scale=6.0
    ),
    max_width=720,
    max_height=720,
    max_num_frames=49,
    vae_tiling=True,
)
FAMILIES = {f.pipeline_class: f for f in (SVD, COGVIDEOX)}


def read_config(path: Path) -> dict:
    """Read a component's JSON config (config.json, scheduler_config.json, ...)."""
    return json.loads(path.read_text())


def detect_family(model_dir: Path) -> Family:
    """Recognise the family of a diffusers pipeline folder from its model_index.json.

    Raises:
        PlanError: Not a pipeline folder, or a pipeline class this server does not run.
    """
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        raise PlanError(f"{model_dir} is not a diffusers pipeline folder (no model_index.json)")
    class_name = read_config(index_path).get("_class_name", "")
    family = FAMILIES.get(class_name)
    if family is None:
        raise PlanError(f"pipeline class {class_name!r} is not supported; supported: {', '.join(FAMILIES)}")
    return family


def spatial_factors(model_dir: Path, family: Family) -> tuple[int, int]:
    """(size multiple, frame multiple) of a pipeline folder, from its VAE and denoiser configs."""
    vae = read_config(model_dir / "vae" / "config.json")
    multiple = 2 ** (len(vae["block_out_channels"]) - 1)
    if family is COGVIDEOX:
        denoiser = read_config(model_dir / family.denoiser / "config.json")
        multiple *= int(denoiser.get("patch_size", 1))
        # The VAE decodes latent frames in pairs after a first group of three (diffusers'
        # AutoencoderKLCogVideoX.num_latent_frames_batch_size = 2), so only an odd number T of latent
        # frames gives the 4(T-1)+1 frames asked for: num_frames = 8k+1 (CogVideoX's documented rule).
        return multiple, COGVIDEOX_LATENT_BATCH * int(vae.get("temporal_compression_ratio", 4))
    return multiple, 1


def resolve_limits(
    model_dir: Path,
    family: Family,
    max_width: int = 0,
    max_height: int = 0,
    max_num_frames: int = 0,
    max_steps: int = MAX_STEPS,
) -> tuple[VideoDefaults, VideoLimits]:
    """Resolve the defaults and limits a server applies to requests for the pipeline in `model_dir`.

    Precedence, lowest to highest: the family's published defaults, the folder's scriptreel.json, the
    server's maxima (0 keeps the folder's or family's). Defaults larger than a maximum are lowered to it
    (logged), so a request of all zeros is always valid.
    """
    sidecar: dict = {}
    if (model_dir / SIDECAR).is_file():
        sidecar = read_config(model_dir / SIDECAR)
    base = family.defaults
    defaults = VideoDefaults(
        width=int(sidecar.get("default_width", base.width)),
        height=int(sidecar.get("default_height", base.height)),
        num_frames=int(sidecar.get("default_num_frames", base.num_frames)),
        fps=int(sidecar.get("default_fps", base.fps)),
        num_inference_steps=int(sidecar.get("default_num_inference_steps", base.num_inference_steps)),
        guidance_scale=float(sidecar.get("default_guidance_scale", base.guidance_scale)),
    )
    size_multiple, frame_multiple = spatial_factors(model_dir, family)
    limits = VideoLimits(
        size_multiple=size_multiple,
        max_width=_round_down(max_width or int(sidecar.get("max_width", family.max_width)), size_multiple),
        max_height=_round_down(
            max_height or int(sidecar.get("max_height", family.max_height)), size_multiple
        ),
        max_num_frames=_frames_down(
            max_num_frames or int(sidecar.get("max_num_frames", family.max_num_frames)), frame_multiple
        ),
        frame_multiple=frame_multiple,
        max_steps=max_steps,
        min_size=-(-MIN_SIZE // size_multiple) * size_multiple,
    )
    fitted = dataclasses.replace(
        defaults,
        width=min(defaults.width, limits.max_width),
        height=min(defaults.height, limits.max_height),
        num_frames=min(defaults.num_frames, limits.max_num_frames),
        num_inference_steps=min(defaults.num_inference_steps, limits.max_steps),
    )
    if fitted != defaults:
        log.info("request defaults lowered to the server's maxima: %s", fitted)
    return fitted, limits


def _round_down(value: int, multiple: int) -> int:
    if value < multiple:
        raise PlanError(f"a maximum size of {value} is below the pipeline's size multiple {multiple}")
    return value - value % multiple


def _frames_down(value: int, multiple: int) -> int:
    if value < 1:
        raise PlanError(f"max_num_frames must be at least 1, got {value}")
    return value - (value - 1) % multiple
