"""Conditioning images: a deterministic keyframe drawn from text, and safe decoding of uploaded images.

The gateway draws a keyframe for each scene when an image-to-video pipeline gets no image; the video
server decodes the images clients send, refusing what it cannot or should not decode.
"""

from __future__ import annotations

import hashlib
import io
import textwrap
import warnings

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from serving.errors import InvalidArgument
from vram.sizes import format_bytes

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_IMAGE_BYTES = 8 << 20  # GenerateVideoRequest.image: at most 8 MiB
MAX_IMAGE_PIXELS = 4096 * 4096


def render_keyframe(text: str, width: int, height: int, seed: int = 0) -> bytes:
    """Draw a PNG keyframe for `text`: a gradient and soft shapes in colours hashed from it, and the text.

    The same (text, width, height, seed) always gives the same bytes (with the same Pillow).

    Args:
        text: The scene's visual prompt (wrapped onto the image; may be empty).
        width: Width in pixels (1 or more).
        height: Height in pixels (1 or more).
        seed: Mixed into the hash, so scenes with the same text can differ.

    Returns:
        PNG bytes of an RGB image of width x height.
    """
    if width < 1 or height < 1:
        raise ValueError(f"keyframe size must be positive, got {width}x{height}")
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    image = Image.fromarray(_gradient(digest, width, height))
    _draw_shapes(image, digest)
    _draw_text(image, text, digest)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _gradient(digest: bytes, width: int, height: int) -> np.ndarray:
    start = np.array(list(digest[0:3]), dtype=np.float32)
    end = np.array(list(digest[3:6]), dtype=np.float32)
    angle = digest[6] / 255.0 * np.pi
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    along = xs / max(width - 1, 1) * np.cos(angle) + ys / max(height - 1, 1) * np.sin(angle)
    span = float(along.max() - along.min()) or 1.0
    t = ((along - along.min()) / span)[..., None]
    return (start * (1 - t) + end * t).clip(0, 255).astype(np.uint8)


def _draw_shapes(image: Image.Image, digest: bytes) -> None:
    width, height = image.size
    layer = Image.new("RGB", image.size)
    mask = Image.new("L", image.size)
    draw_layer, draw_mask = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    for i in range(3):
        b = digest[8 + 6 * i : 14 + 6 * i]
        cx, cy = b[0] / 255 * width, b[1] / 255 * height
        r = (0.1 + b[2] / 255 * 0.3) * min(width, height)
        box = (cx - r, cy - r, cx + r, cy + r)
        draw_layer.ellipse(box, fill=(b[3], b[4], b[5]))
        draw_mask.ellipse(box, fill=140)
    blur = max(1, min(width, height) // 16)
    image.paste(layer, (0, 0), mask.filter(ImageFilter.GaussianBlur(blur)))


def _draw_text(image: Image.Image, text: str, digest: bytes) -> None:
    text = " ".join(text.split())
    width, height = image.size
    if not text or min(width, height) < 32:
        return
    size = max(8, min(width, height) // 12)
    font = ImageFont.load_default(size=size)
    chars_per_line = max(8, int(width * 0.9 / (size * 0.55)))
    lines = textwrap.wrap(text, chars_per_line)[: max(1, int(height * 0.8 / (size * 1.25)))]
    shade = 255 if sum(digest[0:6]) < 3 * 255 else 0
    draw = ImageDraw.Draw(image)
    y = (height - len(lines) * size * 1.25) / 2
    for line in lines:
        left, _, right, _ = draw.textbbox((0, 0), line, font=font)
        draw.text(((width - (right - left)) / 2, y), line, font=font, fill=(shade,) * 3)
        y += size * 1.25


def decode_image(
    data: bytes, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode a client's image (PNG, JPEG or WebP) into an RGB PIL image.

    Args:
        data: The encoded image.
        max_bytes: Largest accepted encoded size.
        max_pixels: Largest accepted width x height (checked from the header, before decoding).

    Raises:
        InvalidArgument: With a violation on field "image": empty, too large, not an image, a format other
            than PNG/JPEG/WebP, too many pixels, or damaged data.
    """
    if not data:
        raise InvalidArgument.field("image", "is empty")
    if len(data) > max_bytes:
        raise InvalidArgument.field(
            "image", f"is {format_bytes(len(data))}; the limit is {format_bytes(max_bytes)}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
            if image.width * image.height > max_pixels:
                raise InvalidArgument.field(
                    "image", f"is {image.width}x{image.height}; the limit is {max_pixels} pixels"
                )
            image.load()
            return image.convert("RGB")
    except InvalidArgument:
        raise
    except Image.UnidentifiedImageError:
        raise InvalidArgument.field(
            "image", f"is not a decodable image; send one of {', '.join(ALLOWED_FORMATS)}"
        ) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidArgument.field("image", "could not be decoded (damaged or truncated data)") from None
