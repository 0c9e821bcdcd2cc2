"""``imaging.device_decodable``: only JPEGs that a GPU decoder turns into the same pixels as the CPU path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curation import imaging
from tests import helpers


def _jpeg(**kw) -> bytes:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_baseline_jpeg_is_decodable() -> None:
    assert imaging.device_decodable(_jpeg(quality=90))
    assert imaging.device_decodable(_jpeg(quality=90, subsampling=0))  # 4:4:4
    assert imaging.device_decodable(_jpeg(quality=90, exif=_exif(1)))  # upright: nothing to rotate


@pytest.mark.parametrize(
    "name, data",
    [
        ("progressive", _jpeg(progressive=True)),
        ("exif rotated", _jpeg(exif=_exif(6))),
        ("exif mirrored", _jpeg(exif=_exif(2))),
        ("cmyk", helpers.cmyk_jpeg()),
        ("greyscale", helpers.image_bytes(np.random.default_rng(0), "JPEG")),
        ("png", helpers.image_bytes(np.random.default_rng(0), "PNG", mode="RGB")),
        ("png 16-bit", helpers.png_16bit()),
        ("truncated", _jpeg()[:-200]),
        ("empty", b""),
    ],
)
def test_everything_else_keeps_the_cpu_path(name: str, data: bytes) -> None:
    assert not imaging.device_decodable(data), name


def test_header_fields_that_change_the_meaning() -> None:
    data = bytearray(_jpeg())
    sof = data.index(b"\xff\xc0")
    twelve_bit = data.copy()
    twelve_bit[sof + 4] = 12  # sample precision
    assert not imaging.device_decodable(bytes(twelve_bit))
    rgb_ids = data.copy()
    rgb_ids[sof + 10 : sof + 19 : 3] = b"RGB"  # component ids that libjpeg reads as RGB, not YCbCr
    assert not imaging.device_decodable(bytes(rgb_ids))
    # Over the configured size cap: the CPU path gives it its too_large reject.
    assert not imaging.device_decodable(bytes(data), imaging.DecodeConfig(max_pixels=100))
    # An XMP orientation, which Pillow also applies.
    xmp = b"\xff\xe1" + (2 + 60).to_bytes(2, "big") + b"http://ns.adobe.com/xap/1.0/\x00<tiff:Orientation>6</x>"
    xmp += b" " * (62 - 2 - len(xmp) + 4)
    assert not imaging.device_decodable(bytes(data[:2]) + xmp + bytes(data[2:]))
