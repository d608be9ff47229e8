"""A video request and the events a generation yields, as plain data; and request validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from PIL import Image

from media.keyframe import MAX_IMAGE_BYTES, decode_image
from serving.errors import FieldViolation, InvalidArgument, collect
from video_server.families import VideoDefaults, VideoLimits
from vram.monitor import MemorySnapshot

IMAGE_TO_VIDEO = "image-to-video"
TEXT_TO_VIDEO = "text-to-video"
MAX_GUIDANCE_SCALE = 50.0
# Smallest conditioning image side: SVD blurs the image before resizing it, and its reflection padding
# needs at least two pixels per side; 8 leaves a margin and is no real restriction.
MIN_IMAGE_SIDE = 8


@dataclass(frozen=True)
class VideoParams:
    """One video request (fields as in GenerateVideoRequest; zero numeric fields take the defaults).

    Attributes:
        prompt: Text prompt (text-to-video pipelines).
        negative_prompt: Negative prompt (text-to-video pipelines).
        image: Encoded conditioning image (image-to-video pipelines).
        width: Frame width in pixels.
        height: Frame height in pixels.
        num_frames: Frames to render.
        fps: Frame rate of the video (SVD is also conditioned on it).
        num_inference_steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale (SVD: the last frame's; the first frame's is 1).
        seed: Random seed; 0 picks one.
        conditioning: The decoded image, filled in by validation (not part of the request).
    """

    prompt: str = ""
    negative_prompt: str = ""
    image: bytes = b""
    width: int = 0
    height: int = 0
    num_frames: int = 0
    fps: int = 0
    num_inference_steps: int = 0
    guidance_scale: float = 0.0
    seed: int = 0
    conditioning: Image.Image | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Progress:
    """Progress of a generation: "denoise" once per step; "decode" and "encode" once, as they start."""

    stage: str
    step: int
    total_steps: int


@dataclass(frozen=True)
class Chunk:
    """A piece of the encoded video (at most 1 MiB)."""

    data: bytes


@dataclass(frozen=True)
class Result:
    """The finished video (GenerateVideoResponse.result), plus the seed that was used."""

    mime_type: str
    num_frames: int
    width: int
    height: int
    fps: int
    sha256: str
    duration_seconds: float
    size_bytes: int
    memory: MemorySnapshot
    seed: int


VideoEvent = Progress | Chunk | Result


def validate_params(
    params: VideoParams, modality: str, defaults: VideoDefaults, limits: VideoLimits
) -> VideoParams:
    """Fill the defaults of zero fields and check every field against the limits.

    Returns:
        The complete request; for image-to-video, with the decoded image in `conditioning`.

    Raises:
        InvalidArgument: Listing every bad field at once (field names as in GenerateVideoRequest).
    """
    p = dataclasses.replace(
        params,
        width=params.width or defaults.width,
        height=params.height or defaults.height,
        num_frames=params.num_frames or defaults.num_frames,
        fps=params.fps or defaults.fps,
        num_inference_steps=params.num_inference_steps or defaults.num_inference_steps,
        guidance_scale=params.guidance_scale or defaults.guidance_scale,
    )
    bad = [
        *_size_violations(p, limits),
        *_frame_violations(p.num_frames, limits),
        *_number_violations(p, limits),
        *_text_violations(p, modality, limits),
    ]
    conditioning = None
    if modality == IMAGE_TO_VIDEO:
        conditioning = _conditioning(p, bad)
    collect(bad)
    return dataclasses.replace(p, conditioning=conditioning)


def _size_violations(p: VideoParams, limits: VideoLimits) -> list[FieldViolation]:
    bad = []
    for name, value, maximum in (
        ("width", p.width, limits.max_width),
        ("height", p.height, limits.max_height),
    ):
        if value < 0 or value % limits.size_multiple:
            bad.append(FieldViolation(name, f"{value} is not a positive multiple of {limits.size_multiple}"))
        elif value < limits.min_size:
            bad.append(FieldViolation(name, f"{value} is under the minimum of {limits.min_size}"))
        elif value > maximum:
            bad.append(FieldViolation(name, f"{value} is over the maximum of {maximum}"))
    return bad


def _number_violations(p: VideoParams, limits: VideoLimits) -> list[FieldViolation]:
    bad = []
    if not 1 <= p.num_inference_steps <= limits.max_steps:
        bad.append(FieldViolation("num_inference_steps", f"must be 1 to {limits.max_steps}"))
    if not 1 <= p.fps <= limits.max_fps:
        bad.append(FieldViolation("fps", f"must be 1 to {limits.max_fps}"))
    if not (math.isfinite(p.guidance_scale) and 0 <= p.guidance_scale <= MAX_GUIDANCE_SCALE):
        bad.append(FieldViolation("guidance_scale", f"must be 0 to {MAX_GUIDANCE_SCALE:g}"))
    return bad


def _text_violations(p: VideoParams, modality: str, limits: VideoLimits) -> list[FieldViolation]:
    bad = [
        FieldViolation(name, f"is {len(text)} characters; the limit is {limits.max_prompt_chars}")
        for name, text in (("prompt", p.prompt), ("negative_prompt", p.negative_prompt))
        if len(text) > limits.max_prompt_chars
    ]
    if modality == TEXT_TO_VIDEO and not p.prompt.strip():
        bad.append(FieldViolation("prompt", "is required by this text-to-video pipeline"))
    return bad


def _conditioning(p: VideoParams, bad: list[FieldViolation]) -> Image.Image | None:
    """Decode an image-to-video request's image; on failure add the violation and return None."""
    if p.conditioning is not None:
        return p.conditioning
    if not p.image:
        bad.append(FieldViolation("image", "is required by this image-to-video pipeline"))
        return None
    try:
        image = decode_image(p.image, max_bytes=MAX_IMAGE_BYTES)
    except InvalidArgument as exc:
        bad += exc.violations
        return None
    if min(image.size) < MIN_IMAGE_SIDE:
        size = f"{image.width}x{image.height}"
        bad.append(FieldViolation("image", f"is {size}; at least {MIN_IMAGE_SIDE} pixels a side"))
        return None
    return image


def _frame_violations(num_frames: int, limits: VideoLimits) -> list[FieldViolation]:
    step = limits.frame_multiple
    if not 1 <= num_frames <= limits.max_num_frames:
        return [FieldViolation("num_frames", f"must be 1 to {limits.max_num_frames}")]
    if (num_frames - 1) % step:
        below = num_frames - (num_frames - 1) % step
        return [
            FieldViolation(
                "num_frames",
                f"must be {step}k+1 for this pipeline (e.g. {below} or {below + step}), got {num_frames}",
            )
        ]
    return []
