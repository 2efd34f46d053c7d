"""Image bytes in and out of shards: sniff the format, verify a full decode, resize at pack time.

Decoding is bounded: an image over ``MAX_PIXELS`` is refused before its pixels are allocated
(decompression bombs), and a truncated file is refused rather than padded with grey.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image

from memetrain.data.records import Rejected

MAX_PIXELS = 64_000_000
"""Largest image accepted (width x height); real memes are well under 10 MP."""

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format from its first bytes, as a file extension; None if unknown."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def read_image_file(id: str, path: Path, shown_as: str | None = None) -> tuple[bytes, str]:
    """Bytes and sniffed format of an image file; a missing, empty or non-image file is rejected."""
    name = shown_as or str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Rejected(id, f"image file {name} not found") from None
    except IsADirectoryError:
        raise Rejected(id, f"image path {name} is a directory, not an image file") from None
    except OSError as err:
        raise Rejected(id, f"image file {name} cannot be read ({err.strerror})") from None
    if not data:
        raise Rejected(id, f"image file {name} is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise Rejected(id, f"image file {name} is not a JPEG, PNG, GIF, BMP or WebP image")
    return data, fmt


def open_verified(id: str, data: bytes) -> Image.Image:
    """Fully decode ``data``; truncation, corruption and oversize images are ``Rejected``."""
    if not data:
        raise Rejected(id, "image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise Rejected(
                    id,
                    f"image is {width}x{height} pixels, over the {MAX_PIXELS:,} pixel limit "
                    "(a decompression bomb or a scan far too large for a meme)",
                )
            image.load()
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Rejected(id, f"image refused as a decompression bomb ({err})") from None
    except Exception as err:  # PIL raises many types for corrupt data
        raise Rejected(id, f"image cannot be decoded ({type(err).__name__}: {err})") from None
    return image


def shrink(image: Image.Image, longest: int) -> Image.Image:
    """Resize so the longest side is ``longest`` pixels, keeping the aspect ratio."""
    scale = longest / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def encode(image: Image.Image, fmt: str, jpeg_quality: int) -> bytes:
    """Encode to ``jpg`` or ``png``; JPEG drops alpha onto white, as a viewer would show it."""
    buffer = io.BytesIO()
    if fmt == "jpg":
        if image.mode in ("RGBA", "LA", "P"):
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        elif image.mode != "RGB":
            image = image.convert("RGB")
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    elif fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        raise ValueError(f"cannot encode images as {fmt!r}; use 'jpg' or 'png'")
    return buffer.getvalue()
