"""H.264 mp4 in memory: encode frames, join clips, read back what a file holds.

Encoding goes through PyAV (libx264, yuv420p) with `movflags=+faststart`, so the index sits before the
media data and players can start while the bytes still arrive. The muxer's faststart pass reopens its
output by name, so the encoder writes to a private temporary file and returns its bytes; reading works
in memory (`io.BytesIO`).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"
# Visually transparent for rendered video at a modest size. "veryfast" because encoding sits on every
# request's critical path: with it (and the frames converted to 8 bits on the GPU) SVD-XT's mp4 stage
# took 0.21-0.33 s on an H200 host, 0.74 s before (bench/results/video_profile.json). The bytes of two
# encodes of the same frames are not always identical (seen with PyAV 18's x264, one thread or
# several); the decoded pictures agree to within compression noise.
ENCODER_OPTIONS = {"crf": "18", "preset": "veryfast"}


@dataclass(frozen=True)
class Mp4Info:
    """What an mp4's video stream holds.

    Attributes:
        num_frames: Decoded frames.
        width: Frame width in pixels.
        height: Frame height in pixels.
        fps: Frames per second (rounded to an integer).
        codec: Codec name, e.g. "h264".
        duration_seconds: num_frames / fps.
    """

    num_frames: int
    width: int
    height: int
    fps: int
    codec: str
    duration_seconds: float


def encode_mp4(frames: Sequence[np.ndarray] | np.ndarray, fps: int) -> bytes:
    """Encode RGB frames as an H.264 mp4.

    Args:
        frames: uint8 frames of shape (H, W, 3), all the same size; a (N, H, W, 3) array works too.
            Odd widths or heights are cropped by one pixel (yuv420p needs even sizes).
        fps: Frames per second (1 or more).

    Returns:
        The mp4 file's bytes.

    Raises:
        ValueError: No frames, frames of another shape or dtype, or fps below 1.
    """
    if len(frames) == 0:
        raise ValueError("encode_mp4 needs at least one frame")
    if fps < 1:
        raise ValueError(f"fps must be at least 1, got {fps}")
    first = np.asarray(frames[0])
    if first.ndim != 3 or first.shape[2] != 3 or first.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 arrays of shape (H, W, 3), got {first.dtype} {first.shape}")
    height, width = first.shape[0] & ~1, first.shape[1] & ~1
    if height == 0 or width == 0:
        raise ValueError(f"frames of {first.shape[1]}x{first.shape[0]} are too small to encode")
    for i, frame in enumerate(frames):
        if np.shape(frame) != first.shape:
            raise ValueError(f"frame {i} has shape {np.shape(frame)}; the first frame's is {first.shape}")
    return _encode((np.asarray(f)[:height, :width] for f in frames), width, height, fps)


def _encode(frames: Iterable[np.ndarray], width: int, height: int, fps: int) -> bytes:
    with tempfile.TemporaryDirectory(prefix="scriptreel-mp4-") as tmp:
        path = Path(tmp) / "video.mp4"
        _write(path, frames, width, height, fps)
        return path.read_bytes()


def _write(path: Path, frames: Iterable[np.ndarray], width: int, height: int, fps: int) -> None:
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(CODEC, rate=Fraction(fps, 1), options=dict(ENCODER_OPTIONS))
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, PIXEL_FORMAT
        stream.codec_context.time_base = Fraction(1, fps)
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)  # explicit: no guessed timestamps
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def decode_mp4(data: bytes) -> list[np.ndarray]:
    """Decode every frame of an mp4 into uint8 RGB arrays of shape (H, W, 3)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def concat_mp4(clips: Sequence[bytes], fps: int) -> bytes:
    """Join mp4 clips into one, in order, at `fps`.

    The clips are decoded and re-encoded; frames of a different size are resized to the first clip's.

    Raises:
        ValueError: No clips, or clips without frames.
    """
    if not clips:
        raise ValueError("concat_mp4 needs at least one clip")
    frames: list[np.ndarray] = []
    for clip in clips:
        frames.extend(decode_mp4(clip))
    if not frames:
        raise ValueError("the clips hold no frames")
    height, width = frames[0].shape[:2]
    return encode_mp4([_fit(f, width, height) for f in frames], fps)


def _fit(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    if frame.shape[:2] == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))


def probe_mp4(data: bytes) -> Mp4Info:
    """Read an mp4's frame count, size, rate and codec (by decoding it: exact, and cheap at these sizes).

    Raises:
        ValueError: The bytes are not a readable video.
    """
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.base_rate or Fraction(0)
            num_frames = sum(1 for _ in container.decode(video=0))
            codec, width, height = stream.codec_context.name, stream.width, stream.height
    except (av.error.FFmpegError, IndexError) as exc:
        raise ValueError(f"not a readable video: {exc}") from exc
    fps = round(float(rate))
    return Mp4Info(
        num_frames=num_frames,
        width=width,
        height=height,
        fps=fps,
        codec=codec,
        duration_seconds=num_frames / fps if fps else 0.0,
    )
