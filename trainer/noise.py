"""Input noise and targets, applied per batch in Ray Data tasks upstream of the training workers.

Images are read by URI. A URI ``<container>#<member>`` names an image inside a WebDataset tar shard or a
Parquet file of image bytes (``curation.shards``): the rows of a batch that name one container are read
together, with one pass over it (a tar streamed from start to end, a Parquet file's row groups that hold
them), never one member at a time. ``trainer.data`` puts all the rows of a container in one batch, so each
container is read once per pass over the data.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import random
import sys
from collections import defaultdict
from collections.abc import Iterator
from types import ModuleType

import numpy as np
from PIL import Image

from curation import access, imaging, shards, storage
from trainer.config import NoiseConfig

log = logging.getLogger(__name__)


def _auto_augment() -> ModuleType:
    """timm's ``timm.data.auto_augment``, loaded on its own. The module needs only PIL and numpy, but importing
    it through the timm package imports torch and every model first: 3 s of CPU and hundreds of MB in each
    data task's process, which decodes and noises images and never touches torch. Loaded by its file, it
    costs milliseconds; ``tests/trainer/test_noise.py`` checks that it stays torch-free."""
    name = "timm.data.auto_augment"
    if name in sys.modules:
        return sys.modules[name]
    found = importlib.util.find_spec("timm")
    if found is None or not found.submodule_search_locations:
        raise ImportError("timm is not installed")
    path = f"{list(found.submodule_search_locations)[0]}/data/auto_augment.py"
    spec = importlib.util.spec_from_file_location("nstudent_timm_auto_augment", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randaugment(noise: NoiseConfig, mean: tuple[float, float, float]):
    """timm's RandAugment, or None when it is off. timm caps the magnitude at 10 unless told its maximum
    (``mmax``): a magnitude over 10 (the paper's 27, say) is honoured, each op's strength scaled as in the
    official TensorFlow RandAugment (magnitude / 10 of the op's range)."""
    if noise.randaugment_ops == 0:
        return None
    m = noise.randaugment_magnitude
    spec = f"rand-m{m}-n{noise.randaugment_ops}-mstd{noise.randaugment_magnitude_std}-mmax{max(10, m)}"
    fill = noise.fill if noise.fill is not None else tuple(int(round(255 * m)) for m in mean)
    return _auto_augment().rand_augment_transform(spec, {"img_mean": fill})


class ImageNoise:
    """The input noise of one image, in the paper's order: a random-resized crop (else the centre crop), a
    horizontal flip, RandAugment, random erasing. Random draws come from Python's ``random``, as timm's."""

    def __init__(self, noise: NoiseConfig, mean: tuple[float, float, float]) -> None:
        self.noise = noise
        self.augment = randaugment(noise, mean)

    def resize(self, img: Image.Image, size: int, crop_pct: float) -> Image.Image:
        if self.noise.crop_scale >= 1:
            return imaging.resize_square(img, size, crop_pct)
        return random_resized_crop(img, size, self.noise.crop_scale)

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.noise.flip and random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.augment is not None:
            img = self.augment(img)
        if random.random() < self.noise.erase_prob:
            img = random_erase(img)
        return img


def random_resized_crop(img: Image.Image, size: int, min_scale: float) -> Image.Image:
    """A crop of ``min_scale`` to all of the image's area at an aspect ratio of 3/4 to 4/3, resized to
    ``size`` square (Inception's crop); the centre crop when ten draws do not fit."""
    area = img.width * img.height
    for _ in range(10):
        target = area * random.uniform(min_scale, 1.0)
        ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= img.width and 0 < h <= img.height:
            left, top = random.randint(0, img.width - w), random.randint(0, img.height - h)
            return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    return imaging.resize_square(img, size)


def random_erase(img: Image.Image) -> Image.Image:
    """One rectangle of 2% to 33% of the area, at an aspect ratio of 0.3 to 3.3, replaced by random pixels."""
    area = img.width * img.height
    for _ in range(10):
        target = area * random.uniform(0.02, 1 / 3)
        ratio = math.exp(random.uniform(math.log(0.3), math.log(1 / 0.3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w < img.width and 0 < h < img.height:
            left, top = random.randint(0, img.width - w), random.randint(0, img.height - h)
            noise = np.random.default_rng(random.getrandbits(64)).integers(0, 256, (h, w, 3), dtype=np.uint8)
            img = img.copy()
            img.paste(Image.fromarray(noise), (left, top))
            return img
    return img


# Column of a prepared batch: -1 for an image decoded, else the index of its reason in imaging.REJECT_REASONS.
# A row whose image cannot be used is never dropped and never fails a task: it keeps its place with zero
# pixels, and the training loop leaves it out and counts it by reason (so a stream keeps its length, and the
# counts reach the model's metrics).
SKIP = "skip"
KEPT = -1
# The column of a row's noise seed (trainer.data): Python's and NumPy's global generators are seeded with it
# before the row is noised.
NOISE_SEED = "noise_seed"
# Input columns that a prepared batch does not carry on.
_NOT_CARRIED = ("uri", NOISE_SEED)
_REASON_INDEX = {r: i for i, r in enumerate(imaging.REJECT_REASONS)}


def _fetch(uris: np.ndarray, max_file_bytes: int) -> Iterator[tuple[list[int], bytes | BaseException]]:
    """(the rows that name one image, its bytes or the error reading it raised), once per distinct image: a
    plain file read once whatever its copies, the members of one container read together in one pass over it
    (a tar in its own order, a Parquet file's row groups that hold them), as they come."""
    plain: dict[str, list[int]] = defaultdict(list)
    contained: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, uri in enumerate(uris):
        uri = str(uri)
        parts = shards.split(uri)
        if parts is None:
            plain[uri].append(i)
        else:
            contained[parts[0]][parts[1]].append(i)
    # Plain files are read several at a time (a remote store's latency hidden). An object or container that is
    # missing or forbidden comes back as its error, its images' skip; a store still failing after its client's
    # retries raises storage.StorageUnavailable and fails the task, so no image is skipped for a fault of the store.
    # Only regular files, of at most max_file_bytes, are read (curation.access); the rows' roots were checked by
    # the job before training started.
    policy = access.ReadPolicy(None, max_file_bytes)
    for rows, data in zip(plain.values(), storage.iter_read(list(plain), reader=policy.read)):
        yield rows, data
    for container, members in contained.items():
        left = dict(members)
        error: BaseException | None = None
        try:
            if shards.is_tar(container):
                for name, data in shards.read_tar_members(container, list(left)):
                    yield left.pop(name), data
            else:
                numbered = {int(m): m for m in left if m.isdigit()}
                for row, data in shards.read_parquet_rows(container, numbered):
                    yield left.pop(numbered[row]), data
        except (OSError, ValueError) as e:  # a store that still fails: StorageUnavailable, the task's to retry
            error = storage.object_error(container, e)
        except Exception as e:  # noqa: BLE001 - tarfile.TarError...: members read before it are kept
            error = e
        for member, rows in left.items():
            yield rows, error or FileNotFoundError(f"{container} holds no member {member!r}")


def _decode(
    uri: str,
    data: bytes | BaseException,
    size: int,
    crop_pct: float,
    decode: imaging.DecodeConfig | None,
    augment: ImageNoise | None,
    seed: int | None = None,
) -> tuple[np.ndarray | None, int]:
    """(pixels, KEPT) or (None, the index of the reason it is skipped). With ``seed``, the noise is drawn from
    Python's and NumPy's global generators seeded with it."""
    if isinstance(data, BaseException):
        reason = (
            data.reason
            if isinstance(data, access.Refused)
            else imaging.TOO_LARGE
            if isinstance(data, MemoryError)
            else imaging.MISSING
        )
        log.warning("skipping %s: %s: %s", uri, type(data).__name__, data)
        return None, _REASON_INDEX[reason]
    try:
        resize = augment.resize if augment is not None else None
        if augment is not None and seed is not None:
            random.seed(seed)
            np.random.seed(seed % 2**32)  # timm's RandAugment draws its ops from NumPy's global generator
        return imaging.decode_for_model(data, size, crop_pct, decode, transform=augment, resize=resize), KEPT
    except imaging.RejectedImage as e:  # the only exception it raises
        log.warning("skipping %s: %s", uri, e)
        return None, _REASON_INDEX[e.reason]


def _decoded_rows(
    batch: dict[str, np.ndarray],
    size: int,
    crop_pct: float,
    noise: NoiseConfig | None,
    mean,
    decode: imaging.DecodeConfig | None,
) -> Iterator[tuple[int, np.ndarray | None, int]]:
    """(row, pixels or None, KEPT or the skip reason's index) of every row, in the order the images are read;
    a row with a ``NOISE_SEED`` is noised from its seed."""
    augment = ImageNoise(noise, mean) if noise is not None else None
    uris, seeds = batch["uri"], batch.get(NOISE_SEED)
    for rows, data in _fetch(uris, (decode or imaging.DecodeConfig()).max_file_bytes):
        for i in rows:
            seed = None if seeds is None else int(seeds[i])
            yield (i, *_decode(str(uris[i]), data, size, crop_pct, decode, augment, seed))


def load_pixels(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    crop_pct: float,
    noise: NoiseConfig | None,
    mean,
    decode: imaging.DecodeConfig | None = None,
) -> dict[str, np.ndarray]:
    """Read, decode, resize and (with ``noise``) augment every row, in the batch's order; a row whose image
    cannot be used has zero pixels and its reason in ``SKIP``."""
    n = len(batch["uri"])
    pixels = np.zeros((n, size, size, 3), np.uint8)
    skip = np.full(n, KEPT, np.int8)
    for i, px, code in _decoded_rows(batch, size, crop_pct, noise, mean, decode):
        skip[i] = code
        if px is not None:
            pixels[i] = px
    out = {k: v for k, v in batch.items() if k not in _NOT_CARRIED}
    out["pixels"], out[SKIP] = pixels, skip
    return out


def iter_pixels(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    crop_pct: float,
    noise: NoiseConfig | None,
    mean,
    chunk_rows: int,
    decode: imaging.DecodeConfig | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """``load_pixels`` in pieces of ``chunk_rows`` rows, in the order the images are read (a container's own
    order): memory holds one piece of pixels and one image's bytes, never a whole container."""
    order: list[int] = []
    pixels = np.zeros((chunk_rows, size, size, 3), np.uint8)
    skip = np.full(chunk_rows, KEPT, np.int8)

    def piece() -> dict[str, np.ndarray]:
        n = len(order)
        out = {k: v[order] for k, v in batch.items() if k not in _NOT_CARRIED}
        out["pixels"], out[SKIP] = pixels[:n].copy(), skip[:n].copy()
        return out

    for i, px, code in _decoded_rows(batch, size, crop_pct, noise, mean, decode):
        j = len(order)
        pixels[j] = 0 if px is None else px
        skip[j] = code
        order.append(i)
        if len(order) == chunk_rows:
            yield piece()
            order.clear()
    if order:
        yield piece()


def skipped_counts(skip: np.ndarray) -> dict[str, int]:
    """Rows skipped by reason, from the ``SKIP`` column of prepared batches."""
    skip = np.asarray(skip, np.int64)
    counts = np.bincount(skip[skip >= 0], minlength=len(imaging.REJECT_REASONS))
    return {r: int(c) for r, c in zip(imaging.REJECT_REASONS, counts) if c}


def hard_targets(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    t = np.full((len(labels), num_classes), smoothing / num_classes, dtype=np.float32)
    t[np.arange(len(labels)), labels] += 1.0 - smoothing
    return t


def soft_targets(topk_classes: np.ndarray, topk_probs: np.ndarray, num_classes: int, temperature: float) -> np.ndarray:
    """Dense targets from top-k soft labels, renormalised over the k classes, sharpened by 1/temperature."""
    probs = np.asarray(topk_probs, dtype=np.float64) ** (1.0 / temperature)
    probs /= np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
    t = np.zeros((len(probs), num_classes), dtype=np.float32)
    np.put_along_axis(t, np.asarray(topk_classes, dtype=np.int64), probs.astype(np.float32), axis=1)
    return t
