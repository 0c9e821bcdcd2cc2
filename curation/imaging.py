"""Decoding images from bytes, one at a time, so that one bad file never fails a batch."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# Reasons an image is rejected; each lands in the rejects table with a detail message.
MISSING = "missing"  # the URI could not be read (no such file or object, no permission)
EMPTY = "empty"  # zero bytes
NOT_AN_IMAGE = "not_an_image"  # bytes that no image decoder recognises
CORRUPT = "corrupt"  # a recognised format that fails to decode (truncated, damaged)
REJECT_REASONS = (MISSING, EMPTY, NOT_AN_IMAGE, CORRUPT)

# Decompression bombs are errors, not warnings: a single 50k x 50k PNG must not take a worker down.
Image.MAX_IMAGE_PIXELS = 1 << 28


# File signatures of common image formats: bytes that start like an image but fail to decode are corrupt,
# not "not an image".
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


class RejectedImage(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decoded RGB image, or RejectedImage with the reason."""
    if not data:
        raise RejectedImage(EMPTY, "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # PIL decodes lazily: force it here so truncation surfaces now
            return img.convert("RGB")
    except UnidentifiedImageError as e:
        reason = CORRUPT if _looks_like_image(data) else NOT_AN_IMAGE
        raise RejectedImage(reason, str(e)[:200]) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RejectedImage(CORRUPT, f"{type(e).__name__}: {e}"[:200]) from None


def resize_square(img: Image.Image, size: int, crop_pct: float = 1.0) -> Image.Image:
    """Resize the shorter side to size/crop_pct and take the centred size x size crop."""
    scale = size / crop_pct / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_array(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8."""
    return np.asarray(img, dtype=np.uint8)
