"""Input noise and targets, applied per batch in Ray Data tasks upstream of the training workers."""

from __future__ import annotations

import logging

import numpy as np
from timm.data.auto_augment import rand_augment_transform

from curation import imaging
from service import storage
from trainer.config import NoiseConfig

log = logging.getLogger(__name__)


def randaugment(noise: NoiseConfig, mean: tuple[float, float, float]):
    """timm's RandAugment, or None when it is off."""
    if noise.randaugment_ops == 0:
        return None
    spec = f"rand-m{noise.randaugment_magnitude}-n{noise.randaugment_ops}-mstd{noise.randaugment_magnitude_std}"
    fill = noise.fill if noise.fill is not None else tuple(int(round(255 * m)) for m in mean)
    return rand_augment_transform(spec, {"img_mean": fill})


def load_pixels(
    batch: dict[str, np.ndarray], *, size: int, crop_pct: float, noise: NoiseConfig | None, mean
) -> dict[str, np.ndarray]:
    """Decode, resize and (with ``noise``) augment every row; rows that fail to decode are dropped and logged."""
    augment = randaugment(noise, mean) if noise is not None else None
    keep, pixels = [], []
    for i, uri in enumerate(batch["uri"]):
        try:
            img = imaging.decode_rgb(storage.read_bytes(str(uri)))
        except (OSError, ValueError, imaging.RejectedImage) as e:
            log.warning("skipping %s: %s", uri, e)
            continue
        img = imaging.resize_square(img, size, crop_pct)
        if augment is not None:
            img = augment(img)
        keep.append(i)
        pixels.append(imaging.to_array(img))
    out = {k: v[keep] for k, v in batch.items() if k != "uri"}
    out["pixels"] = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
    return out


def hard_targets(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    t = np.full((len(labels), num_classes), smoothing / num_classes, dtype=np.float32)
    t[np.arange(len(labels)), labels] += 1.0 - smoothing
    return t


def soft_targets(
    topk_classes: np.ndarray, topk_probs: np.ndarray, num_classes: int, temperature: float
) -> np.ndarray:
    """Dense targets from top-k soft labels, renormalised over the k classes, sharpened by 1/temperature."""
    probs = np.asarray(topk_probs, dtype=np.float64) ** (1.0 / temperature)
    probs /= np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
    t = np.zeros((len(probs), num_classes), dtype=np.float32)
    np.put_along_axis(t, np.asarray(topk_classes, dtype=np.int64), probs.astype(np.float32), axis=1)
    return t
