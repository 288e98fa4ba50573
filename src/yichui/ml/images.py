"""Images as models take them: decoded under limits, oriented, and known by their pixels.

::

    limits = ImageLimits.from_settings(settings)
    image = decode(data, "messages.0.content.1.image_url", limits)
    image.image, image.digest, image.mode, image.size   # a Pillow image, and its identity
    image.data, image.media_type                        # what an upstream is sent

The rules, in order (each refusal an :class:`~yichui.errors.RequestError` naming ``where``):

1. at most ``max_bytes`` of encoded bytes;
2. only the formats of :data:`FORMATS` are even looked at (``Image.open(..., formats=...)``:
   no other decoder of Pillow's ever sees the bytes);
3. the size comes from the header, and more than ``max_pixels`` is refused *before* a pixel is
   decoded (a decompression bomb costs nothing but its header);
4. an animation (GIF, WebP, APNG) gives its first frame, or is refused (``animated``);
5. the pixels are decoded: a truncated or corrupt file is refused here;
6. the EXIF orientation is applied before anything else looks at the pixels, so a photo taken
   sideways is one picture whichever way it was stored.

The identity (``digest``) is the SHA-256 of the mode, the size, the palette (``P`` images)
and every pixel: the same picture sent as PNG, as lossless WebP or as BMP has one digest, one
changed pixel gives another. Pillow is imported inside the functions.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from yichui.errors import RequestError

if TYPE_CHECKING:
    from yichui.config import Settings

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
"""The image formats decoded (Pillow's names); any other is refused unread."""
DIGEST_PREFIX = "px1-"
"""Marks a pixel digest (1: mode, size, palette, pixels)."""
_ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What an image may cost; the defaults are the settings' (see ``docs/multimodal.md``)."""

    max_bytes: int = 10 * 1024**2
    max_pixels: int = 4096 * 4096
    per_request: int = 8
    per_message: int = 4
    animated: Literal["first_frame", "refuse"] = "first_frame"

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_bytes=settings.image_max_bytes,
            max_pixels=settings.image_max_pixels,
            per_request=settings.images_per_request,
            per_message=settings.images_per_message,
            animated=settings.image_animated,
        )


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """An image that passed every rule: the picture, its identity and what to forward."""

    image: Any
    """The decoded Pillow image (oriented; the first frame of an animation)."""
    digest: str
    mode: str
    size: tuple[int, int]
    data: bytes
    """The bytes as they came, or a PNG of ``image`` when orienting or taking a frame changed
    what they show (an upstream then sees exactly what the digest stands for)."""
    media_type: str


def decode(data: bytes, where: str, limits: ImageLimits) -> DecodedImage:
    """``data`` decoded under ``limits`` (see the module docstring); 400 naming ``where``."""
    from PIL import Image, ImageOps

    if len(data) > limits.max_bytes:
        raise RequestError(
            f"image is {len(data)} bytes, more than the {limits.max_bytes} allowed "
            "(image_max_bytes)",
            param=where,
        )
    try:
        with warnings.catch_warnings():
            # our own limit is checked below, from the header; Pillow's bomb check is a backstop
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError:
        raise RequestError(_too_many_pixels(None, limits), param=where) from None
    except Exception:  # UnidentifiedImageError, or a decoder's own error on a broken header
        raise RequestError(
            f"not an image in an accepted format ({', '.join(FORMATS)})", param=where
        ) from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise RequestError(_too_many_pixels((width, height), limits), param=where)
    if width < 1 or height < 1:
        raise RequestError("image has no pixels", param=where)
    fmt = str(image.format)
    changed = False
    if getattr(image, "is_animated", False) and getattr(image, "n_frames", 1) > 1:
        if limits.animated == "refuse":
            raise RequestError("animated images are refused (image_animated = refuse)", param=where)
        changed = True  # the first frame is what is kept, and forwarded
    try:
        image.seek(0)
        image.load()
    except Exception:  # OSError "image file is truncated", decoder errors, EOFError
        raise RequestError(f"image is truncated or corrupt ({fmt})", param=where) from None
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: the pixels are fine, there is no orientation
        orientation = 1
    if orientation not in (1, None):
        image = ImageOps.exif_transpose(image)
        changed = True
    if changed:
        image = image.copy()  # detached from the file (a frame of it) before it is re-encoded
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data, media_type = buffer.getvalue(), "image/png"
    else:
        media_type = Image.MIME.get(fmt, "application/octet-stream")
    return DecodedImage(
        image=image,
        digest=pixel_digest(image),
        mode=str(image.mode),
        size=(int(image.size[0]), int(image.size[1])),
        data=data,
        media_type=media_type,
    )


def b64decode(payload: str | bytes) -> bytes:
    """Strict base64 (only the alphabet, padding where it belongs; ``binascii.Error`` or
    ``ValueError`` otherwise), as ``binascii.a2b_base64(strict_mode=True)`` but SIMD-fast:
    40x less time on the megabytes of a photo's data URL (``pybase64``)."""
    import pybase64

    return pybase64.b64decode(payload, validate=True)


def pixel_digest(image: Any) -> str:
    """``px1-<sha256>`` of ``image``'s mode, size, palette (if any) and pixels."""
    h = hashlib.sha256(f"{image.mode}\0{image.size[0]}x{image.size[1]}\0".encode())
    if image.mode in ("P", "PA"):
        h.update(bytes(image.getpalette() or ()))
        h.update(b"\0")
    h.update(image.tobytes())
    return DIGEST_PREFIX + h.hexdigest()


def read_file(path: Path, where: str, roots: list[Path], limits: ImageLimits) -> bytes:
    """The bytes of a local image file under one of ``roots`` (where the path leads, links
    followed, is checked before anything says whether it exists); 400 otherwise."""
    if not roots:
        raise RequestError("local image files are disabled (see image_file_roots)", param=where)
    real = Path(os.path.realpath(path))
    if not path.is_absolute() or not any(real.is_relative_to(os.path.realpath(r)) for r in roots):
        raise RequestError("image file is outside image_file_roots", param=where)
    try:
        with open(real, "rb") as fh:
            data = fh.read(limits.max_bytes + 1)
    except OSError:
        raise RequestError("image file not found or not readable", param=where) from None
    return data  # one byte over the limit is enough for decode() to refuse it


def fit(image: Any, max_pixels: int) -> Any:
    """``image`` scaled down (keeping its shape) to at most ``max_pixels``; as it is when it
    fits. Converted to RGB, what vision processors take."""
    from PIL import Image

    width, height = image.size
    if width * height > max_pixels:
        scale = (max_pixels / (width * height)) ** 0.5
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image if image.mode == "RGB" else image.convert("RGB")


def _too_many_pixels(size: tuple[int, int] | None, limits: ImageLimits) -> str:
    what = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
    return f"image is {what}, more than the {limits.max_pixels} allowed (image_max_pixels)"
