"""Real images for the tests, made with Pillow: pictures, re-encodings, and broken ones.

::

    data = png(64, 48, seed=1)             # random pixels (the same seed, the same picture)
    url = data_url(data)                   # data:image/png;base64,...
    part = image_part(data)                # an ImagePart, decoded as the API decodes it
    bomb(), truncated(png(64, 64))         # refused with a 400
"""

from __future__ import annotations

import base64
import io
from typing import Any

from yichui.inference.engine import ImageDetail, ImagePart
from yichui.ml.images import ImageLimits, decode

MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


def picture(width: int = 64, height: int = 48, *, seed: int = 0, mode: str = "RGB") -> Any:
    """A Pillow image of random pixels (deterministic per seed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def encode(image: Any, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    if fmt == "WEBP":
        options.setdefault("lossless", True)
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(width: int = 64, height: int = 48, *, seed: int = 0) -> bytes:
    return encode(picture(width, height, seed=seed))


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes, detail: ImageDetail = "auto") -> ImagePart:
    """``data`` decoded as the API decodes a data URL."""
    return ImagePart.of(decode(data, "test", ImageLimits()), detail=detail)


def with_pixel(image: Any, xy: tuple[int, int] = (0, 0), value: Any = (1, 2, 3)) -> Any:
    """A copy of ``image`` with one pixel changed."""
    changed = image.copy()
    old = changed.getpixel(xy)
    changed.putpixel(xy, value if value != old else (value[0] ^ 1, *value[1:]))
    return changed


def bomb(width: int = 12_000, height: int = 12_000) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb:
    a few hundred bytes that would decode to gigabytes)."""
    from PIL import Image

    return encode(Image.new("1", (width, height)), optimize=True)


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """``data`` cut short (a header that reads, pixels that do not)."""
    return data[: int(len(data) * keep)]


def animated_gif(frames: int = 3, size: tuple[int, int] = (16, 16)) -> bytes:
    pictures = [picture(*size, seed=i) for i in range(frames)]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:])
    return buffer.getvalue()


def rotated_jpeg(image: Any, orientation: int = 6) -> bytes:
    """``image`` stored as a JPEG with an EXIF orientation tag (6: rotate 90° to show)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif, quality=95)
