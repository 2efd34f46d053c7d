"""Image decoding in the stream: the same pixels as the PIL reference, whichever decoder runs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from memetrain.data import decode
from memetrain.data.decode import ImageTooLarge, Row, cached_write_offset, decode_rgb


def pil_reference(data: bytes, reduce_to: int | None) -> torch.Tensor:
    """PIL's decode: draft mode for JPEGs twice the view size, RGB, HWC memory."""
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
    """simplejpeg's decode_jpeg, counting its calls."""
    real = decode.simplejpeg.decode_jpeg

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
    ],
)
def test_small_jpegs_decode_to_the_pil_reference_through_simplejpeg(mode, options, monkeypatch):
    calls = []
    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", _counting(calls))
    data = encoded(mode, (61, 47), **options)
    image = decode_rgb(data, 32)
    assert calls, "a JPEG under twice the view size goes to simplejpeg"
    assert image.shape == (3, 47, 61) and image.dtype == torch.uint8
    assert image.stride() == (1, 61 * 3, 3)  # HWC memory: batches stack with a plain copy
    assert torch.equal(image, pil_reference(data, 32))


def test_cmyk_jpegs_decode_through_pil_whose_conversion_differs(monkeypatch):
    calls = []
    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", _counting(calls))
    data = encoded("CMYK", (61, 47))
    assert torch.equal(decode_rgb(data, 32), pil_reference(data, 32)) and not calls


def test_large_jpegs_decode_at_a_reduced_scale():
    data = encoded("RGB", (260, 140))
    image = decode_rgb(data, 64)  # 140 // 64 = 2: libjpeg scales the DCT by 1/2, as PIL's draft
    assert image.shape == (3, 70, 130)
    assert torch.equal(image, pil_reference(data, 64))
    assert torch.equal(decode_rgb(data, None), pil_reference(data, None))  # no view size: full size
    # finer steps than PIL's 1/2, 1/4, 1/8: 3/8 of 600 is 225, the smallest scale still >= 224
    ramp = np.linspace(0, 255, 600, dtype=np.uint8)
    smooth = Image.fromarray(np.stack([np.add.outer(ramp, ramp) // 2] * 3, axis=-1).astype(np.uint8))
    buffer = io.BytesIO()
    smooth.save(buffer, "JPEG", quality=95)
    image = decode_rgb(buffer.getvalue(), 224)
    assert image.shape == (3, 225, 225)
    box = np.array(smooth.resize((225, 225), Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(image.permute(1, 2, 0).numpy().astype(np.int16) - box).mean() < 2


def row_of(height: int, width: int) -> Row:
    hwc = torch.zeros(height, width, 3, dtype=torch.uint8)
    return Row(hwc.numpy(), hwc.permute(2, 0, 1))


def test_a_jpeg_of_the_rows_size_is_decoded_into_it_and_others_ignore_it():
    data = encoded("RGB", (61, 47))
    row = row_of(47, 61)
    image = decode_rgb(data, 32, out=row)
    assert image is row.image and torch.equal(image, pil_reference(data, 32))
    other = row_of(47, 60)
    image = decode_rgb(data, 32, out=other)
    assert image.data_ptr() != other.image.data_ptr() and not other.pixels.any()
    assert torch.equal(image, pil_reference(data, 32))
    png = encoded("RGB", (61, 47), "PNG")
    assert decode_rgb(png, 32, out=row).data_ptr() != row.image.data_ptr()  # only JPEGs decode in place


def test_jpegs_decode_into_memory_that_the_simd_colour_conversion_writes_through_the_cache():
    for height, width in ((47, 61), (224, 224), (64, 96)):
        image = decode_rgb(encoded("RGB", (width, height)))
        assert image.data_ptr() % 32 == 16  # 16 past a 32-byte boundary: no non-temporal stores
    assert [cached_write_offset(address) for address in (0, 16, 17, 32, 4095)] == [16, 0, 31, 16, 17]


def test_png_and_webp_decode_through_pil():
    for fmt, mode in (("PNG", "RGBA"), ("PNG", "L"), ("WEBP", "RGB")):
        data = encoded(mode, (33, 21), fmt)
        assert torch.equal(decode_rgb(data, 16), pil_reference(data, 16))


def test_oversize_truncated_and_garbage_images_are_refused(monkeypatch):
    monkeypatch.setattr(decode, "MAX_PIXELS", 61 * 47 - 1)
    data = encoded("RGB", (61, 47))
    with pytest.raises(ImageTooLarge, match="61x47, over the 2,866 pixel limit"):
        decode_rgb(data, 32)
    png = encoded("RGB", (61, 47), "PNG")
    with pytest.raises(ImageTooLarge, match="61x47"):
        decode_rgb(png, 32)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="Premature end of JPEG file"):
        decode_rgb(data[: len(data) // 2], 32)
    with pytest.raises(ValueError, match="Could not determine subsampling"):
        decode_rgb(b"\xff\xd8\xff garbage", 32)
    with pytest.raises(UnidentifiedImageError):
        decode_rgb(b"GIF89a not really", 32)


def test_a_batch_of_jpegs_decodes_in_one_native_call_to_simplejpegs_pixels():
    assert decode._decode_rows is not None, "the native decoder was not built (setup.py): pip install -e ."
    size = (61, 47)
    decoded = [  # every kind of 3-component JPEG the pack or a source may hold, at the rows' size
        encoded("RGB", size, quality=90),  # 4:2:0
        encoded("RGB", size, quality=75, subsampling=0),  # 4:4:4
        encoded("RGB", size, quality=80, subsampling=1),  # 4:2:2
        encoded("RGB", size, progressive=True),
        encoded("RGB", size, quality=95, optimize=True),
    ]
    refused = [  # decode_rgb's to decode: it names their errors or takes another path
        encoded("L", size),  # one component
        encoded("CMYK", size),  # PIL's conversion
        encoded("RGB", (60, 47)),  # another size
        decoded[0][: len(decoded[0]) // 2],  # truncated: libjpeg's warning is an error, as in simplejpeg
        b"\xff\xd8\xff garbage",
        encoded("RGB", size, "PNG"),
        b"",
    ]
    rows = np.zeros((len(decoded) + len(refused) + 1, 47, 61, 3), dtype=np.uint8)
    statuses = decode.decode_jpeg_rows([memoryview(data) for data in decoded + refused], rows)
    assert list(statuses) == [1] * len(decoded) + [0] * len(refused)
    for data, row in zip(decoded, rows):
        assert torch.equal(torch.from_numpy(row).permute(2, 0, 1), decode_rgb(data))
    assert not rows[-1].any()  # nothing past the images
    with pytest.raises(ValueError, match="out holds"):
        decode.decode_jpeg_rows(decoded, rows[:2])


def test_without_the_native_decoder_batches_decode_one_image_at_a_time(monkeypatch):
    monkeypatch.setattr(decode, "_decode_rows", None)
    assert not decode.native_rows()
    assert decode.decode_jpeg_rows([encoded("RGB", (61, 47))], np.zeros((1, 47, 61, 3), np.uint8)) is None
