"""Decoding images from bytes, one at a time, so that one bad file never fails a batch.

Contract: ``decode_for_model`` turns the bytes of one file into a ``size x size x 3`` uint8 array, or raises
``RejectedImage`` with one of ``REJECT_REASONS``; it raises nothing else for anything the bytes may hold
(MemoryError included). The image's width and height are checked against ``DecodeConfig`` from the header,
before a single pixel is decoded, so a few-kilobyte file that claims 10^10 pixels costs nothing. What is
kept is decoded with its real range and orientation: 16-bit images are scaled to 8 bits (not clipped),
EXIF orientation is applied, transparent pixels are composited on ``DecodeConfig.background``, CMYK and
palette images are converted, and an animated image gives its first frame. A JPEG at least twice as large as
the centred crop needs is decoded at a reduced scale by the JPEG decoder (``DecodeConfig.draft``).

``device_decodable`` says, from the bytes alone, whether a GPU JPEG decoder (nvJPEG through
``torchvision.io.decode_jpeg``) would give the same image as ``decode_rgb``: only then may labeling decode it
on the device. Anything it is unsure of goes to ``decode_rgb``.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Callable
from typing import Annotated

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field

from curation.config import Config

# Reasons an image is rejected; each lands in the rejects table with a detail message.
MISSING = "missing"  # the URI could not be read (no such file or object, no permission)
EMPTY = "empty"  # zero bytes
NOT_AN_IMAGE = "not_an_image"  # bytes that no image decoder recognises
CORRUPT = "corrupt"  # a recognised format that fails to decode (truncated, damaged)
TOO_LARGE = "too_large"  # more pixels than DecodeConfig.max_pixels (a decompression bomb), or out of memory
BAD_GEOMETRY = "bad_geometry"  # a side of zero pixels, or sides more unequal than DecodeConfig.max_aspect_ratio
OUTSIDE_ROOTS = "outside_roots"  # not under a root the generation may read (curation.access): never opened
NOT_REGULAR_FILE = "not_regular_file"  # a device, FIFO, socket or folder: never read
# New reasons go at the end: training batches carry a reason as its index in this tuple.
REJECT_REASONS = (MISSING, EMPTY, NOT_AN_IMAGE, CORRUPT, TOO_LARGE, BAD_GEOMETRY, OUTSIDE_ROOTS, NOT_REGULAR_FILE)

_Channel = Annotated[int, Field(ge=0, le=255)]

# PIL's own decompression-bomb check is off: every image's size is checked against DecodeConfig.max_pixels
# right after Image.open (which reads the header only), so the configured cap is the one that applies.
Image.MAX_IMAGE_PIXELS = None


class DecodeConfig(Config):
    """Limits on what one image may be, and how images with transparency are flattened."""

    max_pixels: int = Field(
        100_000_000,
        ge=1,
        le=1 << 40,
        description="largest image accepted, in pixels (width x height from the file's header; 100 megapixels "
        "is 300 MB decoded as RGB); a larger one is rejected as too_large before it is decoded",
    )
    max_aspect_ratio: float = Field(
        50.0,
        ge=1,
        le=1_000_000,
        description="largest accepted ratio of the longer side to the shorter (pixels per pixel); more is "
        "rejected as bad_geometry: resizing a 1 x 100,000 strip to the model's input would take gigabytes",
    )
    background: tuple[_Channel, _Channel, _Channel] = Field(
        (255, 255, 255), description="RGB colour (0-255 per channel) that transparent pixels are composited on"
    )
    max_file_bytes: int = Field(
        64 << 20,
        ge=1,
        le=1 << 34,
        description="largest file or object read whole, in bytes (an image, or a member of a tar shard); a larger "
        "one is rejected as too_large unread",
    )
    draft: bool = Field(
        True,
        description="decode a JPEG at least twice as large as the model's input needs at 1/2, 1/4 or 1/8 scale, "
        "in the JPEG decoder itself (never below the size needed), before resizing it: 2 to 8 times less "
        "decoding on large photos; off: every JPEG decoded at full size",
    )


# File signatures of common image formats: bytes that start like an image but fail to decode are corrupt,
# not "not an image".
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


class RejectedImage(Exception):
    """An image that is not labeled or trained on: ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _detail(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:200]


def check_geometry(width: int, height: int, config: DecodeConfig) -> None:
    """RejectedImage unless a ``width x height`` image is within the limits of ``config``."""
    if width <= 0 or height <= 0:
        raise RejectedImage(BAD_GEOMETRY, f"{width} x {height} pixels")
    if width * height > config.max_pixels:
        raise RejectedImage(TOO_LARGE, f"{width} x {height} pixels, over the cap of {config.max_pixels}")
    if max(width, height) > config.max_aspect_ratio * min(width, height):
        raise RejectedImage(
            BAD_GEOMETRY, f"{width} x {height} pixels, aspect ratio over the cap of {config.max_aspect_ratio:g}"
        )


# Modes of more than 8 bits per channel, and how far their values reach: scaled, not clipped, to 0..255.
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _to_8_bit(img: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) greyscale image as 8-bit L over its type's full range; a float image as
    0..1 (or 0..255 when its values reach above 1)."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if np.nanmax(values, initial=0.0) <= 1.0 else 255.0
    else:
        top = _WIDE_MODES[img.mode]
    scaled = np.nan_to_num(values * (255.0 / top), nan=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if img.mode in _WIDE_MODES or img.mode == "F":
        img = _to_8_bit(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _orient(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a damaged EXIF block leaves the pixels as they are stored (they did
    decode, and the orientation is a hint)."""
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an upright image
    except Exception:  # noqa: BLE001 - any parser error in metadata; the pixels are good
        pass
    return img


def decode_rgb(data: bytes, config: DecodeConfig | None = None, *, shorter_side: int = 0) -> Image.Image:
    """Fully decoded, oriented RGB image, or RejectedImage with the reason. With ``shorter_side`` (and
    ``config.draft``), a JPEG may come out smaller, down to 1/8 of its size, with both sides at least that.

    Only RejectedImage and MemoryError leave it; ``decode_for_model`` turns the latter into a reject too.
    """
    config = config or DecodeConfig()
    if not data:
        raise RejectedImage(EMPTY, "zero bytes")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only: no pixel is decoded yet
    except UnidentifiedImageError as e:
        reason = CORRUPT if _looks_like_image(data) else NOT_AN_IMAGE
        raise RejectedImage(reason, str(e)[:200]) from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a header parser is a damaged file
        raise RejectedImage(CORRUPT, _detail(e)) from None
    check_geometry(img.width, img.height, config)
    try:
        if shorter_side and config.draft:
            img.draft(None, (shorter_side, shorter_side))  # JPEG only; other formats ignore it
        with warnings.catch_warnings():
            # e.g. "Palette images with Transparency expressed in bytes should be converted to RGBA images":
            # handled below, and not worth a line per image in the logs.
            warnings.simplefilter("ignore")
            img.load()  # PIL decodes lazily: force it here so truncation surfaces now
            return _to_rgb(_orient(img), config.background)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises on damaged data
        raise RejectedImage(CORRUPT, _detail(e)) from None


def decode_for_model(
    data: bytes,
    size: int,
    crop_pct: float = 1.0,
    config: DecodeConfig | None = None,
    transform: Callable[[Image.Image], Image.Image] | None = None,
    resize: Callable[[Image.Image, int, float], Image.Image] | None = None,
) -> np.ndarray:
    """The bytes of one image as ``size x size x 3`` uint8: decoded, resized (shorter side to size/crop_pct) and
    centre-cropped, or made square by ``resize`` (a random crop, say), and, with ``transform``, transformed
    (e.g. RandAugment). Raises RejectedImage and nothing else: a MemoryError is ``too_large``, any other error
    ``corrupt`` with the exception in the detail."""
    try:
        # The centred crop's resize needs the shorter side at size/crop_pct; a random crop (``resize``) may
        # zoom in, so it gets the full image.
        shorter_side = 0 if resize is not None else math.ceil(size / crop_pct)
        img = (resize or resize_square)(decode_rgb(data, config, shorter_side=shorter_side), size, crop_pct)
        if transform is not None:
            img = transform(img)
        return to_array(img)
    except RejectedImage:
        raise
    except MemoryError as e:
        raise RejectedImage(TOO_LARGE, _detail(e)) from None
    except Exception as e:  # noqa: BLE001 - one image's failure, whatever it is, is that image's reject
        raise RejectedImage(CORRUPT, _detail(e)) from None


def resize_square(img: Image.Image, size: int, crop_pct: float = 1.0) -> Image.Image:
    """Resize the shorter side to size/crop_pct and take the centred size x size crop. Only the crop is
    resized (PIL's ``box``): the pixels of resizing the whole image and cropping it, but for rounding (at most
    2 levels of 255, under 0.2 on average), at up to 40% less resizing work."""
    scale = size / crop_pct / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    left, top = (w - size) // 2, (h - size) // 2
    if (w, h) == img.size:  # already the size: a crop, no resampling
        return img.crop((left, top, left + size, top + size))
    sx, sy = img.width / w, img.height / h  # input pixels per output pixel
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


def to_array(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8."""
    return np.asarray(img, dtype=np.uint8)


# --- which JPEGs a GPU decoder may take ----------------------------------------------------------------------

_SOF0 = 0xC0  # baseline DCT, Huffman: the one frame type whose decoding nvJPEG and libjpeg agree on
# Other frame types (extended, progressive, lossless, hierarchical, arithmetic): C4 (DHT), C8 (JPG) and CC (DAC)
# share the range but are not frames.
_OTHER_SOF = frozenset(range(0xC1, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length
_EXIF_ORIENTATION = 0x0112


def _exif_orientation(payload: bytes) -> int | None:
    """The orientation tag of an APP1 Exif payload's first IFD (1 when absent); None when it cannot be read."""
    tiff = payload[6:]
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, kind, _n = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * k)
            if tag == _EXIF_ORIENTATION:
                return struct.unpack_from(order + ("H" if kind == 3 else "I"), tiff, ifd + 2 + 12 * k + 8)[0]
    except (KeyError, struct.error):
        return None
    return 1


def device_decodable(data: bytes, config: DecodeConfig | None = None) -> bool:
    """Whether ``data`` is a JPEG that a GPU decoder turns into the same RGB pixels as ``decode_rgb`` (up to
    the decoders' rounding), so labeling may decode it on the device. A pure function of the bytes' headers.

    Yes only for: a baseline frame (SOF0) of 8-bit samples with the usual three YCbCr components (ids 1, 2, 3;
    no Adobe segment that says RGB or CMYK), no EXIF orientation other than 1 (``decode_rgb`` rotates; the GPU
    decoder would not), no XMP orientation (Pillow reads that too), not a multi-picture file (MPO), ending in
    EOI (a truncated file is ``decode_rgb``'s to reject), and within ``config``'s size limits (so the CPU path
    gives oversized images their reject reason). Progressive, lossless, arithmetic-coded, 12-bit, greyscale,
    CMYK, RGB-coded JPEGs, and every other format, are no: they keep the CPU path.
    """
    config = config or DecodeConfig()
    if not (data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")):
        return False
    frame: tuple[int, int, int, bytes] | None = None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False  # garbage between segments: libjpeg warns and resyncs; leave it to the CPU
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack_from(">H", data, i + 2)
        payload = data[i + 4 : i + 2 + length]
        if length < 2 or len(payload) != length - 2:
            return False
        if marker == 0xDA:  # start of scan: every header segment has been seen
            break
        if marker in _OTHER_SOF:
            return False
        if marker == _SOF0:
            if len(payload) < 6:
                return False
            precision, height, width, components = struct.unpack_from(">BHHB", payload)
            frame = (precision, height, width, payload[6 : 6 + 3 * components : 3])
        elif marker == 0xE1 and payload.startswith(b"Exif\x00\x00"):
            if _exif_orientation(payload) != 1:
                return False
        elif marker == 0xE1 and b"Orientation" in payload:  # XMP's tiff:Orientation
            return False
        elif marker == 0xE2 and payload.startswith(b"MPF\x00"):
            return False
        elif marker == 0xEE and payload.startswith(b"Adobe") and (len(payload) < 12 or payload[11] != 1):
            return False  # Adobe transform 0 (RGB or CMYK as stored) or 2 (YCCK)
        i += 2 + length
    else:
        return False  # no scan
    if frame is None:
        return False
    precision, height, width, ids = frame
    if precision != 8 or ids != b"\x01\x02\x03":
        return False
    try:
        check_geometry(width, height, config)
    except RejectedImage:
        return False
    return True
