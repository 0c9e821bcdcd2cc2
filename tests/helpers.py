"""Small real inputs for the tests: image files, good and bad, and an untrained model folder."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time

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


def untrained_model(
    uri: str, *, classes: int = 10, architecture: str = "test_resnet", input_size: int = 32
) -> ModelMeta:
    meta = ModelMeta(
        architecture=architecture, class_names=[str(c) for c in range(classes)], input_size=input_size, **DIGIT_STATS
    )
    model = models.create(meta)
    meta.parameters = models.count_parameters(model)
    models.save(model, meta, uri)
    return meta


def faults_temp_dir(pid: int) -> str:
    """The Ray temp dir of the private cluster that the fault scenario run by process ``pid`` starts
    (``tests/faults.py``): its logs and sockets, and the marker of its processes' command lines."""
    return os.path.join("/tmp", f"nst-faults-{pid}")


def kill_process_tree(proc: subprocess.Popen, marker: str, timeout: float = 30) -> None:
    """SIGKILL ``proc``'s process group, then every process whose command line holds ``marker`` (a private Ray
    cluster's temp dir) until none is left: a Ray node's processes may outlive the process that started them."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        left.append(int(pid))
            except OSError:
                continue
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def checkpoint_registered(run_folder: str) -> bool:
    """Whether Ray Train's controller has registered a checkpoint of the run in ``run_folder``, not only written
    one: a checkpoint folder appears while it is still being saved, and a run stopped then resumes from the one
    before it."""
    try:
        with open(os.path.join(run_folder, "checkpoint_manager_snapshot.json")) as f:
            return bool(json.load(f).get("latest_checkpoint_result"))
    except (OSError, ValueError):
        return False


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(side: int = 100_000) -> bytes:
    """A valid-looking 1-bit greyscale PNG header of ``side`` x ``side`` pixels over a few kB of deflated zero
    rows: 10^10 pixels (30 GB as RGB) declared in about 10 kB."""
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + side // 8) * 800, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_16bit() -> bytes:
    """16 x 16 16-bit greyscale: the values 257 * k for k = 0..255, so 8-bit k exactly (mean 127.5)."""
    return _save(Image.fromarray((np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)), "PNG")


def jpeg_with_orientation() -> bytes:
    """Stored 40 wide x 20 high, left half red, right half blue, with EXIF orientation 6 (rotate 90 degrees
    clockwise to display): shown upright it is 20 wide x 40 high, red on top, blue below."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)


def palette_png_with_transparency() -> bytes:
    """8 x 8 palette image: left half palette entry 0 (black, fully transparent), right half entry 1 (red)."""
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    img.paste(1, (4, 0, 8, 8))
    return _save(img, "PNG", transparency=0)


def cmyk_jpeg() -> bytes:
    """16 x 16 CMYK JPEG of pure red (no cyan, full magenta and yellow)."""
    return _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)


def animated_gif() -> bytes:
    """Two 8 x 8 frames: red, then blue."""
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


# name -> (bytes factory, expected reason; "" = kept): files that once failed a labeling or training job.
EDGE_FILES = {
    "strip-1x1000000.png": (lambda rng: _save(Image.new("L", (1, 1_000_000)), "PNG", optimize=True), "bad_geometry"),
    "strip-100000x1.png": (lambda rng: _save(Image.new("L", (100_000, 1)), "PNG", optimize=True), "bad_geometry"),
    "bomb-100000x100000.png": (lambda rng: png_bomb(), "too_large"),
    "grey-16bit.png": (lambda rng: png_16bit(), ""),
    "exif-orientation-6.jpg": (lambda rng: jpeg_with_orientation(), ""),
    "palette-transparent.png": (lambda rng: palette_png_with_transparency(), ""),
    "cmyk.jpg": (lambda rng: cmyk_jpeg(), ""),
    "animated.gif": (lambda rng: animated_gif(), ""),
    **BAD_FILES,
}


def write_edge_files(root: str, seed: int = 0) -> dict[str, str]:
    """Every EDGE_FILES entry under ``root``; returns {path: expected reason ("" = kept)}."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    out = {}
    for name, (make, reason) in EDGE_FILES.items():
        path = os.path.join(root, name)
        with open(path, "wb") as f:
            f.write(make(rng))
        out[path] = reason
    return out
