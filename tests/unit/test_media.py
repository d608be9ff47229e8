"""mp4 encoding, probing and joining; keyframes; safe image decoding."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from media.keyframe import decode_image, render_keyframe
from media.mp4 import Mp4Info, concat_mp4, decode_mp4, encode_mp4, probe_mp4
from serving.errors import InvalidArgument


def gradient_frames(n: int, width: int, height: int) -> np.ndarray:
    """Smooth moving gradients: content an encoder keeps close to the original."""
    ys, xs = np.mgrid[0:height, 0:width]
    frames = [
        np.stack(
            [
                (xs * 255 // max(width - 1, 1) + 8 * i) % 256,
                ys * 255 // max(height - 1, 1),
                np.full_like(xs, 40 * i % 256),
            ],
            axis=-1,
        )
        for i in range(n)
    ]
    return np.asarray(frames, dtype=np.uint8)


def test_encode_then_probe() -> None:
    frames = gradient_frames(10, 96, 64)
    data = encode_mp4(frames, fps=8)
    assert probe_mp4(data) == Mp4Info(
        num_frames=10, width=96, height=64, fps=8, codec="h264", duration_seconds=1.25
    )
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        assert stream.codec_context.pix_fmt == "yuv420p"
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    error = np.abs(np.asarray(decoded, dtype=np.int16) - frames.astype(np.int16)).mean()
    assert error < 4  # visually the same


def test_encoded_files_start_with_their_index() -> None:
    data = encode_mp4(gradient_frames(3, 32, 32), fps=4)
    assert data[4:8] == b"ftyp" and data.index(b"moov") < data.index(b"mdat")  # +faststart


def test_encode_accepts_a_list_and_crops_odd_sizes() -> None:
    frames = list(gradient_frames(3, 35, 21))
    info = probe_mp4(encode_mp4(frames, fps=24))
    assert (info.num_frames, info.width, info.height, info.fps) == (3, 34, 20, 24)


@pytest.mark.parametrize(
    ("frames", "fps", "message"),
    [
        (np.zeros((0, 8, 8, 3), np.uint8), 8, "at least one frame"),
        (np.zeros((2, 8, 8, 3), np.float32), 8, "uint8"),
        (np.zeros((2, 8, 8), np.uint8), 8, "shape"),
        (np.zeros((2, 8, 8, 3), np.uint8), 0, "fps"),
        (np.zeros((2, 1, 8, 3), np.uint8), 8, "too small"),
    ],
)
def test_encode_refuses_what_it_cannot_encode(frames: np.ndarray, fps: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_mp4(frames, fps)


def test_frames_of_another_size_in_one_video_are_refused() -> None:
    with pytest.raises(ValueError, match="frame 1 has shape"):
        encode_mp4([np.zeros((16, 16, 3), np.uint8), np.zeros((32, 16, 3), np.uint8)], fps=8)


def test_concat_joins_clips_resizing_to_the_first() -> None:
    first = encode_mp4(gradient_frames(4, 64, 48), fps=8)
    second = encode_mp4(gradient_frames(3, 32, 32), fps=8)
    joined = concat_mp4([first, second], fps=8)
    assert probe_mp4(joined) == Mp4Info(
        num_frames=7, width=64, height=48, fps=8, codec="h264", duration_seconds=7 / 8
    )
    assert len(decode_mp4(joined)) == 7
    with pytest.raises(ValueError):
        concat_mp4([], fps=8)


def test_probe_refuses_what_is_not_a_video() -> None:
    with pytest.raises(ValueError, match="not a readable video"):
        probe_mp4(b"this is not an mp4")


def test_keyframes_are_deterministic_pngs_of_the_asked_size() -> None:
    text = "a red mountain bike on a rocky trail, golden hour, wide angle, slow tracking shot"
    png = render_keyframe(text, 256, 144, seed=3)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png == render_keyframe(text, 256, 144, seed=3)
    assert png != render_keyframe(text, 256, 144, seed=4) != render_keyframe("a lake", 256, 144, seed=3)
    image = Image.open(io.BytesIO(png))
    assert (image.size, image.mode) == ((256, 144), "RGB")
    pixels = np.asarray(image)
    assert pixels.std() > 10  # a picture, not a flat fill
    for size in ((8, 8), (1024, 576)):
        assert Image.open(io.BytesIO(render_keyframe("", *size, seed=0))).size == size
    with pytest.raises(ValueError):
        render_keyframe("x", 0, 10, seed=0)


def encoded(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=(10, 200, 30, 255)[: len(mode)]).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mode"), [("PNG", "RGB"), ("PNG", "RGBA"), ("JPEG", "RGB"), ("WEBP", "RGBA")]
)
def test_decode_image_accepts_png_jpeg_webp(fmt: str, mode: str) -> None:
    image = decode_image(encoded(fmt, mode=mode), max_bytes=1 << 20, max_pixels=10_000)
    assert (image.size, image.mode) == ((40, 30), "RGB")


@pytest.mark.parametrize(
    ("data", "max_bytes", "max_pixels", "message"),
    [
        (b"", 1 << 20, 10_000, "empty"),
        (b"GIF89a nothing", 1 << 20, 10_000, "not a decodable image"),
        (encoded("GIF"), 1 << 20, 10_000, "not a decodable image"),
        (encoded("BMP"), 1 << 20, 10_000, "not a decodable image"),
        (encoded("PNG")[:60], 1 << 20, 10_000, "could not be decoded"),
        (encoded("PNG"), 10, 10_000, "limit is 10 B"),
        (encoded("PNG", size=(200, 100)), 1 << 20, 10_000, "200x100"),
    ],
)
def test_decode_image_refuses_bad_images_on_field_image(
    data: bytes, max_bytes: int, max_pixels: int, message: str
) -> None:
    with pytest.raises(InvalidArgument) as exc:
        decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    assert [v.field for v in exc.value.violations] == ["image"]
    assert message in exc.value.violations[0].description
