"""Image decoding in the stream: the same pixels as the PIL reference, whichever decoder runs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from memetrain.data import decode
from memetrain.data.decode import ImageTooLarge, decode_rgb


def pil_reference(data: bytes, reduce_to: int | None) -> torch.Tensor:
    """What the stream decoded before torchcodec: PIL, draft mode for JPEGs, RGB, HWC memory."""
    image = Image.open(io.BytesIO(data))
    if reduce_to and image.format == "JPEG":
        image.draft("RGB", (reduce_to, reduce_to))
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def encoded(mode: str, size: tuple[int, int], fmt: str = "JPEG", **options) -> bytes:
    rng = np.random.default_rng(sum(size))
    pixels = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _counting(calls: list):
    """torchcodec's decode_jpeg, counting its calls."""
    real = decode.decode_jpeg

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    return counted


@pytest.mark.parametrize(
    "mode, options",
    [
        ("RGB", {"quality": 90}),  # 4:2:0
        ("RGB", {"quality": 75, "subsampling": 0}),  # 4:4:4
        ("RGB", {"quality": 80, "subsampling": 1}),  # 4:2:2
        ("RGB", {"progressive": True}),
        ("L", {}),
        ("CMYK", {}),
    ],
)
def test_small_jpegs_decode_to_the_pil_reference_through_torchcodec(mode, options, monkeypatch):
    calls = []
    monkeypatch.setattr(decode, "decode_jpeg", _counting(calls))
    data = encoded(mode, (61, 47), **options)
    image = decode_rgb(data, 32)
    assert calls, "a JPEG under twice the view size goes to torchcodec"
    assert image.shape == (3, 47, 61) and image.dtype == torch.uint8
    assert image.stride() == (1, 61 * 3, 3)  # HWC memory: batches stack with a plain copy
    assert torch.equal(image, pil_reference(data, 32))


def test_large_jpegs_decode_in_draft_mode_as_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(decode, "decode_jpeg", _counting(calls))
    data = encoded("RGB", (260, 140))
    image = decode_rgb(data, 64)  # 140 // 64 = 2: libjpeg scales the DCT by 1/2
    assert not calls and image.shape == (3, 70, 130)
    assert torch.equal(image, pil_reference(data, 64))
    assert torch.equal(decode_rgb(data, None), pil_reference(data, None))  # no view size: full size


def test_png_and_webp_decode_through_pil():
    for fmt, mode in (("PNG", "RGBA"), ("PNG", "L"), ("WEBP", "RGB")):
        data = encoded(mode, (33, 21), fmt)
        assert torch.equal(decode_rgb(data, 16), pil_reference(data, 16))


def test_oversize_truncated_and_garbage_images_are_refused(monkeypatch):
    monkeypatch.setattr(decode, "MAX_PIXELS", 61 * 47 - 1)
    data = encoded("RGB", (61, 47))
    with pytest.raises(ImageTooLarge, match="61x47, over the 2,866 pixel limit"):
        decode_rgb(data, 32)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="truncated"):
        decode_rgb(data[: len(data) // 2], 32)
    with pytest.raises(UnidentifiedImageError):
        decode_rgb(b"\xff\xd8\xff garbage", 32)
