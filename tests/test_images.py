"""The image rules (``yichui.ml.images``), on real images made with Pillow."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from tests.images import (
    animated_gif,
    bomb,
    data_url,
    encode,
    picture,
    png,
    rotated_jpeg,
    truncated,
    with_pixel,
)
from yichui.api.openai.protocol import load_image
from yichui.errors import RequestError
from yichui.ml.images import ImageLimits, decode, fit, read_file

LIMITS = ImageLimits()
WHERE = "messages.0.content.1.image_url"


def test_lossless_encodings_are_one_picture() -> None:
    one = picture(31, 17, seed=4)
    digests = {decode(encode(one, fmt), WHERE, LIMITS).digest for fmt in ("PNG", "WEBP", "BMP")}
    assert len(digests) == 1
    assert decode(encode(with_pixel(one, (30, 16))), WHERE, LIMITS).digest not in digests


def test_palette_is_part_of_the_picture() -> None:
    base = Image.new("P", (4, 4), 0)
    base.putpalette([255, 0, 0] + [0] * 765)
    other = base.copy()
    other.putpalette([0, 0, 255] + [0] * 765)  # the same indices, another colour
    assert decode(encode(base), WHERE, LIMITS).digest != decode(encode(other), WHERE, LIMITS).digest


def test_bomb_refused_from_its_header() -> None:
    data = bomb()
    assert len(data) < 100_000  # a few kilobytes declaring 144 megapixels
    started = time.perf_counter()
    with pytest.raises(RequestError, match="12000x12000 pixels") as info:
        decode(data, WHERE, LIMITS)
    assert time.perf_counter() - started < 0.5  # refused before decoding (decoding takes long)
    assert info.value.param == WHERE
    small = ImageLimits(max_pixels=100)
    with pytest.raises(RequestError, match="image_max_pixels"):
        decode(png(11, 10), WHERE, small)


def test_too_many_bytes() -> None:
    with pytest.raises(RequestError, match="image_max_bytes"):
        decode(png(64, 64), WHERE, ImageLimits(max_bytes=100))
    url = data_url(png(64, 64))
    with pytest.raises(RequestError, match="image_max_bytes"):  # refused before base64 decoding
        load_image(url, WHERE, [], ImageLimits(max_bytes=100))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_truncated_refused(fmt: str) -> None:
    data = encode(picture(64, 64), fmt)
    with pytest.raises(RequestError, match=r"truncated or corrupt|accepted format"):
        decode(truncated(data, 0.5), WHERE, LIMITS)


def test_only_listed_formats() -> None:
    for fmt in ("TIFF", "ICO", "PPM"):
        with pytest.raises(RequestError, match="accepted format"):
            decode(encode(picture(8, 8), fmt), WHERE, LIMITS)


def test_animation_first_frame_or_refused() -> None:
    data = animated_gif(frames=3)
    first = decode(data, WHERE, LIMITS)
    assert first.media_type == "image/png"  # re-encoded: only the first frame goes on
    assert first.digest == decode(encode(first.image), WHERE, LIMITS).digest
    with pytest.raises(RequestError, match="animated"):
        decode(data, WHERE, ImageLimits(animated="refuse"))


def test_exif_orientation_applied_first() -> None:
    shown = picture(40, 20).transpose(Image.Transpose.ROTATE_270)  # what orientation 6 shows
    decoded = decode(rotated_jpeg(picture(40, 20)), WHERE, LIMITS)
    assert decoded.size == shown.size == (20, 40)
    assert decoded.media_type == "image/png"


def test_local_files_under_roots_only(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (root / "cat.png").write_bytes(png(8, 8))
    (tmp_path / "secret.png").write_bytes(png(8, 8))
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    assert read_file(root / "cat.png", WHERE, [root], LIMITS) == png(8, 8)
    for path, says in [
        (root / "link.png", "outside"),
        (root / ".." / "secret.png", "outside"),
        (Path("cat.png"), "outside"),
        (root / "missing.png", "not found"),
    ]:
        with pytest.raises(RequestError, match=says):
            read_file(path, WHERE, [root], LIMITS)
    with pytest.raises(RequestError, match="disabled"):
        read_file(root / "cat.png", WHERE, [], LIMITS)
    part = load_image(f"file://{root / 'cat.png'}", WHERE, [root], LIMITS)
    assert (
        part.source == "file"
        and part.digest == load_image(data_url(png(8, 8)), WHERE, [], LIMITS).digest
    )


def test_fit_bounds_pixels_and_keeps_shape() -> None:
    big = picture(400, 200)
    small = fit(big, 20_000)
    assert small.size[0] * small.size[1] <= 20_000 and small.mode == "RGB"
    assert abs(small.size[0] / small.size[1] - 2) < 0.05
    assert fit(picture(10, 10), 20_000).size == (10, 10)
