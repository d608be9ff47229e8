"""The pipelines bench.video measures: how each is built, asked for a video over gRPC, and run in-process."""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from bench.fullsize import build_cogvideox_2b, build_svd_xt
from media.keyframe import render_keyframe
from scriptreel.video.v1 import video_service_pb2 as pb

SEED = 7
KEYFRAME = "a mountain bike"  # SVD-XT's conditioning image is this text's keyframe
PROMPT = "a mountain bike on a forest trail at sunrise"
Run = tuple[str, str, str, dict[str, str]]  # (label, precision, budget, more server settings)


class VideoBench(ABC):
    """A full-size pipeline as this benchmark drives it: its build, its request, its in-process call."""

    name: ClassVar[str]
    folder: ClassVar[str]  # under --workdir
    size: ClassVar[tuple[int, int, int]]  # native width, height, frames
    steps: ClassVar[int]
    guidance: ClassVar[float]
    runs: ClassVar[list[Run]]

    @abstractmethod
    def build(self, folder: Path, device: str) -> None:
        """Write the random-weight full-size folder."""
        ...

    def request(self, size: tuple[int, int, int], steps: int) -> pb.GenerateVideoRequest:
        """The GenerateVideo request of one measured video."""
        return pb.GenerateVideoRequest(
            width=size[0],
            height=size[1],
            num_frames=size[2],
            num_inference_steps=steps,
            guidance_scale=self.guidance,
            seed=SEED,
            **self.conditioning(size),
        )

    @abstractmethod
    def conditioning(self, size: tuple[int, int, int]) -> dict[str, Any]:
        """The request's conditioning fields (an image, or a prompt)."""
        ...

    @abstractmethod
    def latent_shape(self, pipe: Any, size: tuple[int, int, int]) -> tuple[int, ...]:
        """Shape of the initial noise the diffusers pipeline denoises."""
        ...

    @abstractmethod
    def denoise(self, pipe: Any, size: tuple[int, int, int], steps: int, latents: Any, generator: Any) -> Any:
        """Run the diffusers pipeline from `latents` to its final latents."""
        ...

    @abstractmethod
    def decode(self, pipe: Any, latents: Any, frames: int) -> Any:
        """Decode final latents to pixels in [-1, 1], shape (batch, channels, frames, height, width)."""
        ...


class SvdXt(VideoBench):
    """Stable Video Diffusion XT: image-to-video."""

    name = "svd-xt"
    folder = "svd"
    size = (1024, 576, 25)
    steps = 25
    guidance = 3.0  # the family's default
    runs = [
        ("fp16", "fp16", "", {}),
        ("fp16, channels-last", "fp16", "", {"CHANNELS_LAST": "true"}),
        ("auto, 6 GiB budget", "auto", "6GiB", {}),
        ("auto, 4.5 GiB budget (the video's share of a 12 GB card)", "auto", "4608MiB", {}),
        ("fp16, compiled (compiles at start, before the timed request)", "fp16", "", {"COMPILE": "true"}),
    ]
    decode_chunk = 8  # the server's decode chunk without offload

    def build(self, folder: Path, device: str) -> None:
        build_svd_xt(folder, device=device)

    def conditioning(self, size: tuple[int, int, int]) -> dict[str, Any]:
        return {"image": render_keyframe(KEYFRAME, size[0], size[1], seed=1)}

    def latent_shape(self, pipe: Any, size: tuple[int, int, int]) -> tuple[int, ...]:
        width, height, frames = size
        spatial = pipe.vae_scale_factor
        return (1, frames, pipe.unet.config.in_channels // 2, height // spatial, width // spatial)

    def denoise(self, pipe: Any, size: tuple[int, int, int], steps: int, latents: Any, generator: Any) -> Any:
        width, height, frames = size
        image = Image.open(io.BytesIO(render_keyframe(KEYFRAME, width, height, seed=1))).convert("RGB")
        return pipe(
            image,
            width=width,
            height=height,
            num_frames=frames,
            num_inference_steps=steps,
            max_guidance_scale=self.guidance,
            decode_chunk_size=self.decode_chunk,
            latents=latents,
            generator=generator,
            output_type="latent",
        ).frames

    def decode(self, pipe: Any, latents: Any, frames: int) -> Any:
        return pipe.decode_latents(latents, frames, self.decode_chunk)


class CogVideoX2b(VideoBench):
    """CogVideoX-2b: text-to-video (its tokenizer is the tiny model's, models/t2v/tokenizer)."""

    name = "cogvideox-2b"
    folder = "cogvideox"
    size = (720, 480, 49)
    steps = 50
    guidance = 6.0
    runs = [
        ("fp16", "fp16", "", {}),
        ("fp32 (peak; steps cut with --fp32-steps)", "fp32", "", {}),
        ("auto, 6 GiB budget", "auto", "6GiB", {}),
        ("auto, 8 GiB budget (an offloaded plan, if 6 GiB is refused)", "auto", "8GiB", {}),
        ("auto, 16 GiB budget (a 16 GB card to itself)", "auto", "16GiB", {}),
    ]
    tokenizer = Path("models/t2v/tokenizer")

    def build(self, folder: Path, device: str) -> None:
        build_cogvideox_2b(folder, self.tokenizer, device=device)

    def conditioning(self, size: tuple[int, int, int]) -> dict[str, Any]:
        return {"prompt": PROMPT}

    def latent_shape(self, pipe: Any, size: tuple[int, int, int]) -> tuple[int, ...]:
        width, height, frames = size
        spatial = pipe.vae_scale_factor_spatial
        latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
        return (1, latent_frames, pipe.transformer.config.in_channels, height // spatial, width // spatial)

    def denoise(self, pipe: Any, size: tuple[int, int, int], steps: int, latents: Any, generator: Any) -> Any:
        width, height, frames = size
        return pipe(
            prompt=PROMPT,
            width=width,
            height=height,
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=self.guidance,
            max_sequence_length=pipe.transformer.config.max_text_seq_length,  # as the server does
            latents=latents,
            generator=generator,
            output_type="latent",
        ).frames

    def decode(self, pipe: Any, latents: Any, frames: int) -> Any:
        return pipe.decode_latents(latents)


PIPELINES: dict[str, VideoBench] = {b.name: b for b in (SvdXt(), CogVideoX2b())}
