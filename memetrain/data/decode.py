"""One streamed sample's image and text bytes to an image tensor and its text.

JPEGs (what the pack writes) are decoded by simplejpeg, libjpeg-turbo's TurboJPEG API: it reads
the header without PIL's parser (1 µs instead of 17 at 224 px), writes RGB rows straight into
the array, and is 1.3x faster than torchcodec and 2x faster than PIL here, with the same pixels
(same libjpeg-turbo decode, same upsampling and colour conversion). A JPEG at least twice the
view's size on both sides is decoded at a reduced scale: libjpeg scales the DCT by the smallest
of 1/8, 2/8 ... 4/8 that keeps both sides at least the view's size (as PIL's draft mode, with
finer steps), so a large meme costs little more than a small one. CMYK JPEGs, whose conversion
to RGB differs from PIL's by a few levels, and PNG and WebP go through PIL.

libjpeg-turbo's AVX2 colour conversion writes an output row that starts on a 32-byte boundary with
non-temporal stores, which bypass the cache: at 224 px that decode was 8-20 % slower here, and
whoever reads the image next reads it from memory. JPEGs decoded in full are therefore written
into memory 16 bytes past a boundary (:func:`cached_write_offset`), where every row of a width
that is a multiple of 32 is written through the cache (before, where an allocation happened to
fall decided the speed).

A batch of JPEGs of one size is decoded in one call by :func:`decode_jpeg_rows` (the native
``_jpeg_rows``, the same libjpeg-turbo decode with the GIL released once per batch), which saves
the stream's per-image Python and lets worker threads decode in parallel.

The header is always read first, so an image over ``MAX_PIXELS`` is refused before its pixels
are allocated, and a truncated or corrupt image is refused by either decoder.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import simplejpeg
import torch
from PIL import Image

from memetrain.data.images import MAX_PIXELS

try:
    from memetrain.data._jpeg_rows import decode_rows as _decode_rows
except ImportError:  # built without libjpeg-turbo's headers (see setup.py)
    _decode_rows = None

_JPEG_MAGIC = b"\xff\xd8\xff"
STORE_ALIGNMENT = 32
"""Rows starting on this boundary get non-temporal stores; memory for decoded rows is allocated
this much larger than the rows, to place them past one (see :func:`cached_write_offset`)."""
_PIL_COLORSPACES = ("CMYK", "YCCK")  # simplejpeg's names for Adobe JPEGs PIL converts itself


class BadSample(ValueError):
    def __init__(self, key: str, reason: str):
        super().__init__(f"sample {key!r}: {reason}")
        self.key, self.reason = key, reason


class Row(NamedTuple):
    """Memory a JPEG of exactly ``pixels.shape`` is decoded into: ``pixels``, ``[H, W, 3]`` uint8,
    and ``image``, the same memory as the ``[3, H, W]`` tensor that :func:`decode_rgb` then returns."""

    pixels: np.ndarray
    image: torch.Tensor


class ImageTooLarge(ValueError):
    """The header announces more than ``MAX_PIXELS`` pixels; nothing was decoded."""


def decode_rgb(
    data: bytes | memoryview, reduce_to: int | None = None, out: Row | None = None
) -> torch.Tensor:
    """``[3, H, W]`` uint8 RGB of encoded image bytes, a view of HWC memory (channels last).

    ``reduce_to``: the size of the view that will be made of it; a JPEG that large twice over
    is decoded at a reduced scale (see the module docstring). ``out``: where a JPEG of exactly its
    size decoded in full is written (the result is then ``out.image`` itself); other images ignore
    it. Raises :class:`ImageTooLarge`, or whatever PIL or simplejpeg raise for data they cannot
    decode.
    """
    if data[:3] == _JPEG_MAGIC:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        _check_pixels(width, height)
        if colorspace not in _PIL_COLORSPACES:
            if reduce_to and min(width, height) >= 2 * reduce_to:
                array = simplejpeg.decode_jpeg(data, "RGB", min_height=reduce_to, min_width=reduce_to)
            elif out is not None and out.pixels.shape == (height, width, 3):
                simplejpeg.decode_jpeg(data, "RGB", buffer=out.pixels)
                return out.image
            else:
                array = simplejpeg.decode_jpeg(data, "RGB", buffer=empty_rgb(height, width))
            return torch.from_numpy(array).permute(2, 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))  # reads the header only
    _check_pixels(*image.size)
    if image.format == "JPEG" and reduce_to and min(image.size) >= 2 * reduce_to:
        image.draft("RGB", (reduce_to, reduce_to))
    array = np.array(image if image.mode == "RGB" else image.convert("RGB"))  # [H, W, 3], owned
    return torch.from_numpy(array).permute(2, 0, 1)


def native_rows() -> bool:
    """Whether the native batch decoder was built (see setup.py)."""
    return _decode_rows is not None


def decode_jpeg_rows(images: Sequence[bytes | memoryview], rows: np.ndarray) -> bytes | None:
    """Decode each JPEG of exactly ``rows``' image size into its row of ``rows`` (contiguous
    ``[N, H, W, 3]`` uint8, N at least ``len(images)``), in one native call without the GIL. One
    status per image, 1 if decoded; 0 for an image that must go through :func:`decode_rgb` (another
    size or kind, or corrupt: that call then names the error). ``None``: the native decoder was not
    built, decode every image with :func:`decode_rgb`."""
    if _decode_rows is None:
        return None
    return _decode_rows(images, rows, rows.shape[1], rows.shape[2])


def cached_write_offset(address: int) -> int:
    """Bytes past ``address`` to where JPEG rows decoded there are written through the cache (see
    the module docstring): 16 past a 32-byte boundary."""
    return (STORE_ALIGNMENT // 2 - address) % STORE_ALIGNMENT


def cached_rows(storage: torch.UntypedStorage, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous uint8 tensor of ``shape`` in ``storage`` (``STORE_ALIGNMENT`` bytes larger than
    it needs), where JPEG rows decoded into it are written through the cache."""
    return torch.empty(0, dtype=torch.uint8).set_(storage, cached_write_offset(storage.data_ptr()), shape)


def empty_rgb(height: int, width: int) -> np.ndarray:
    """Uninitialised ``[H, W, 3]`` uint8 memory that JPEG rows are decoded into through the cache."""
    flat = np.empty(height * width * 3 + STORE_ALIGNMENT, dtype=np.uint8)
    start = cached_write_offset(flat.ctypes.data)
    return flat[start : start + height * width * 3].reshape(height, width, 3)


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"image is {width}x{height}, over the {MAX_PIXELS:,} pixel limit")


class SampleDecoder:
    """A sample's image bytes to an image tensor, its text bytes to text; anything off raises
    :class:`BadSample`.

    The members themselves (present, in the shard, with valid labels) were checked when the
    split's sample index was made (``sample_index``)."""

    def __init__(self, decode_size: int | None):
        self.decode_size = decode_size

    @staticmethod
    def text(key: str, text: bytes | memoryview) -> str:
        try:
            decoded = str(text, "utf-8")
        except UnicodeDecodeError:
            raise BadSample(key, "txt member is not valid UTF-8") from None
        if not decoded.strip():
            raise BadSample(key, "txt member is empty (a meme needs its text, as the pack requires)")
        return decoded

    def image(self, key: str, image: bytes | memoryview, out: Row | None = None) -> torch.Tensor:
        """``out``: memory the image may be decoded into (see :func:`decode_rgb`)."""
        try:
            return decode_rgb(image, self.decode_size, out)
        except ImageTooLarge as err:
            raise BadSample(key, str(err)) from None
        except Exception as err:  # PIL and simplejpeg raise many types for corrupt data
            raise BadSample(key, f"image cannot be decoded ({type(err).__name__}: {err})") from None
