"""Settings of the video server (environment prefix SCRIPTREEL_VIDEO_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from serving.settings import ModelServerSettings


class VideoSettings(ModelServerSettings):
    """The video server's settings (see ModelServerSettings for the model and precision ones).

    Attributes:
        offload: auto, none, model, group or sequential: where weights live between uses.
        decode_chunk_size: Frames the VAE decodes at once (0: chosen by the plan).
        forward_chunking: Chunk the UNet's feed-forward layers (unset: chosen by the plan).
        vae_tiling: Decode in spatial tiles where the VAE supports it (unset: chosen by the plan).
        split_guidance: Run classifier-free guidance's conditional and unconditional passes one after
            the other: half the denoising activations (unset: on when the plan offloads).
        channels_last: Convolution weights in channels-last layout on CUDA (a speed setting).
        compile: torch.compile (inductor, default mode) the denoiser and the VAE decoder (a speed
            setting). Applies to plans without offload in FP32, BF16, FP16 or FP8 (skipped, with a
            log line, otherwise: INT8, INT4, offload); costs compilation at start, in a warm-up at the
            default request size, and again on the first request of each other size.
        max_width: Largest width a request may ask for (0: the model folder's or its family's limit).
        max_height: Largest height a request may ask for (0: as above).
        max_num_frames: Most frames a request may ask for (0: as above).
        max_steps: Most denoising steps a request may ask for.
    """

    model_config = SettingsConfigDict(env_prefix="SCRIPTREEL_VIDEO_", cli_prog_name="python -m video_server")

    port: int = 50053
    metrics_port: int = 9103
    max_queue: int = 4
    model_dir: Path = Path("models/svd")
    offload: str = "auto"
    decode_chunk_size: int = Field(default=0, ge=0)
    forward_chunking: bool | None = None
    vae_tiling: bool | None = None
    split_guidance: bool | None = None
    channels_last: bool = False
    compile: bool = False
    max_width: int = Field(default=0, ge=0)
    max_height: int = Field(default=0, ge=0)
    max_num_frames: int = Field(default=0, ge=0)
    max_steps: int = Field(default=200, ge=1)
