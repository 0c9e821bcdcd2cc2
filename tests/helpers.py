"""Small real inputs for the tests: image files, good and bad, and an untrained model folder."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from trainer import models
from trainer.models import ModelMeta

DIGIT_STATS = dict(mean=(0.13, 0.13, 0.13), std=(0.31, 0.31, 0.31))


def image_bytes(rng: np.random.Generator, fmt: str = "PNG", size=(28, 28), mode="L") -> bytes:
    shape = size[::-1] + ((3,) if mode == "RGB" else ())
    img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# name -> (bytes factory, expected reason)
BAD_FILES = {
    "empty.png": (lambda rng: b"", "empty"),
    "notes.txt": (lambda rng: b"not an image at all\n" * 20, "not_an_image"),
    "truncated.png": (lambda rng: image_bytes(rng, "PNG", (64, 64), "RGB")[:200], "corrupt"),
    "truncated.jpg": (lambda rng: image_bytes(rng, "JPEG", (64, 64), "RGB")[:300], "corrupt"),
    "garbled.png": (lambda rng: b"\x89PNG\r\n\x1a\n" + rng.bytes(500), "corrupt"),
}


def write_pool(root: str, good: int, seed: int = 0) -> tuple[list[str], dict[str, str]]:
    """``good`` decodable images of mixed formats, sizes and modes, plus every BAD_FILES entry.

    Returns the good paths and {bad path: expected reason}."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    kinds = [("PNG", (28, 28), "L"), ("JPEG", (40, 30), "RGB"), ("PNG", (20, 50), "RGB"), ("BMP", (28, 28), "L")]
    good_paths = []
    for i in range(good):
        fmt, size, mode = kinds[i % len(kinds)]
        path = os.path.join(root, f"img{i:04d}.{fmt.lower()}")
        with open(path, "wb") as f:
            f.write(image_bytes(rng, fmt, size, mode))
        good_paths.append(path)
    bad = {}
    for name, (make, reason) in BAD_FILES.items():
        path = os.path.join(root, name)
        with open(path, "wb") as f:
            f.write(make(rng))
        bad[path] = reason
    return good_paths, bad


def untrained_model(uri: str, *, classes: int = 10, architecture: str = "test_resnet", input_size: int = 32) -> ModelMeta:
    meta = ModelMeta(architecture=architecture, class_names=[str(c) for c in range(classes)],
                     input_size=input_size, **DIGIT_STATS)
    model = models.create(meta)
    meta.parameters = models.count_parameters(model)
    models.save(model, meta, uri)
    return meta
