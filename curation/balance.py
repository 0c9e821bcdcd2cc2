"""Confidence filtering and class balancing, as in the official Noisy Student code.

Two passes over the predictions, both plain functions over Arrow batches so that Ray calls them per block
and tests call them directly:

1. ``class_histogram``: per class, counts of top-1 confidence in 0.01 bins (and one for 1.00); summed over
   all blocks.
2. ``plan`` turns the summed histogram into a per-class threshold and copy ratio: walking the bins down from
   1.0, a class's threshold is the first bin where the running count reaches K, never below the floor; the
   N images at or above it each get K/N copies. ``assign_copies`` rounds K/N stochastically per image:
   floor(K/N), plus one with probability frac(K/N). The draw is a hash of (seed, image_id), so the manifest
   is the same for the same seed however the rows are split into blocks or workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pydantic import Field

from curation.config import MAX_SEED, Config

# Confidence bins as the official filter's thresholds, 0.00 to 1.00: 0.01 wide, and a last bin for 1.00 alone,
# so that a class with K images at a confidence of exactly 1 gets the threshold 1.00. (Statistics written
# before this bin existed have 100 bins.)
BINS_PER_UNIT = 100
NUM_BINS = BINS_PER_UNIT + 1
# Confidences are float32: a value within this much under a bin edge counts in the bin above, so 0.3
# stored as 0.29999998 still passes a 0.3 floor.
_EDGE_EPS = 1e-4


class CurationConfig(Config):
    """How predictions become a training manifest."""

    confidence_floor: float = Field(0.3, ge=0.0, le=1.0, description="drop images whose top-1 confidence is under this")
    images_per_class: int | None = Field(
        None,
        ge=1,
        le=1_000_000_000,
        description="K, images per class after balancing; default: the mean per-class count above the floor",
    )
    balance: bool = Field(True, description="balance classes to about K; false keeps every image above the floor once")
    upsample: bool = Field(True, description="duplicate the images of classes with fewer than K")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the stochastic rounding of copies")


def confidence_bins(confidence: np.ndarray) -> np.ndarray:
    bins = np.floor(confidence.astype(np.float64) * BINS_PER_UNIT + _EDGE_EPS).astype(np.int64)
    return np.clip(bins, 0, NUM_BINS - 1)


def class_histogram(labels: np.ndarray, confidence: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, NUM_BINS) int64 counts."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"label out of range for {num_classes} classes")
    flat = labels * NUM_BINS + confidence_bins(np.asarray(confidence))
    return np.bincount(flat, minlength=num_classes * NUM_BINS).reshape(num_classes, NUM_BINS)


@dataclass(frozen=True)
class Plan:
    """Per-class decisions made from the summed histogram."""

    images_per_class: int  # K
    threshold_bin: np.ndarray  # (C,) int: keep an image when its bin >= this
    eligible: np.ndarray  # (C,) int: N, images at or above the threshold
    ratio: np.ndarray  # (C,) float: expected copies per eligible image

    @property
    def thresholds(self) -> np.ndarray:
        return self.threshold_bin / BINS_PER_UNIT


def plan(hist: np.ndarray, config: CurationConfig) -> Plan:
    hist = np.asarray(hist, dtype=np.int64)
    num_classes = hist.shape[0]
    floor_bin = int(confidence_bins(np.array([config.confidence_floor], dtype=np.float32))[0])
    # at_or_above[c, b]: images of class c whose bin is >= b
    at_or_above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    above_floor = at_or_above[:, floor_bin]
    k = config.images_per_class
    if k is None:
        k = max(1, int(round(above_floor.sum() / num_classes)))
    threshold = np.full(num_classes, floor_bin, dtype=np.int64)
    if config.balance:
        for c in range(num_classes):
            reached = np.nonzero(at_or_above[c, floor_bin:] >= k)[0]
            if reached.size:
                threshold[c] = floor_bin + reached[-1]  # the highest bin where the count reaches K
    eligible = at_or_above[np.arange(num_classes), threshold]
    if config.balance:
        ratio = np.where(eligible > 0, k / np.maximum(eligible, 1), 0.0)
        if not config.upsample:
            ratio = np.minimum(ratio, 1.0)
    else:
        ratio = np.where(eligible > 0, 1.0, 0.0)
    return Plan(images_per_class=k, threshold_bin=threshold, eligible=eligible, ratio=ratio)


def _uniform(image_id: np.ndarray, seed: int) -> np.ndarray:
    """A uniform draw in [0, 1) per image id: splitmix64 of (id, seed)."""
    with np.errstate(over="ignore"):
        x = np.asarray(image_id).astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def copies_for(labels: np.ndarray, confidence: np.ndarray, image_id: np.ndarray, plan: Plan, seed: int) -> np.ndarray:
    """Copies of each image in the manifest (0 drops it)."""
    labels = np.asarray(labels, dtype=np.int64)
    keep = confidence_bins(np.asarray(confidence)) >= plan.threshold_bin[labels]
    ratio = plan.ratio[labels]
    whole = np.floor(ratio)
    extra = _uniform(image_id, seed) < (ratio - whole)
    return np.where(keep, whole + extra, 0).astype(np.int32)


def assign_copies(batch: pa.Table, plan: Plan, seed: int) -> pa.Table:
    """The batch's rows that are kept, with a ``copies`` column."""
    copies = copies_for(
        batch.column("label").to_numpy(),
        batch.column("confidence").to_numpy(),
        batch.column("image_id").to_numpy(),
        plan,
        seed,
    )
    batch = batch.append_column("copies", pa.array(copies, pa.int32()))
    return batch.filter(pa.array(copies > 0))


def rows_digest(image_id: np.ndarray, label: np.ndarray, copies: np.ndarray) -> int:
    """Order-independent 64-bit digest of manifest rows: equal manifests have equal digests, however split."""
    with np.errstate(over="ignore"):
        key = (
            np.asarray(image_id).astype(np.uint64) * np.uint64(1_000_003)
            + np.asarray(label).astype(np.uint64) * np.uint64(65_537)
            + np.asarray(copies).astype(np.uint64)
        )
        h = (_uniform(key.view(np.int64), 0x5EED) * float(1 << 53)).astype(np.uint64)
        return int(np.sum(h, dtype=np.uint64))
