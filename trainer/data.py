"""Ray Data streams for training: labeled and pseudo-labeled rows, decoded and noised in CPU tasks."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import ray

from service import storage
from trainer import noise as noise_lib
from trainer.config import TrainConfig

# Rows per decode/augment task batch.
PREPARE_BATCH_SIZE = 256


def _expand(batch: pa.Table, *, times: int) -> pa.Table:
    """Each row ``copies`` times (1 without the column), then the whole block ``times`` over, pass after
    pass, so that a stream longer than the data walks it like epochs."""
    n = batch.num_rows
    copies = batch.column("copies").to_numpy() if "copies" in batch.column_names else np.ones(n, np.int64)
    idx = np.tile(np.repeat(np.arange(n), copies), times)
    return batch.take(pa.array(idx))


def _prepare(batch: pa.Table, *, config: TrainConfig, num_classes: int, noised: bool) -> dict[str, np.ndarray]:
    labels = batch.column("label").to_numpy().astype(np.int64)
    if config.soft_targets and "topk_probs" in batch.column_names:
        k = len(batch.column("topk_probs")[0])
        classes = batch.column("topk_classes").combine_chunks().flatten().to_numpy().reshape(-1, k)
        probs = batch.column("topk_probs").combine_chunks().flatten().to_numpy().reshape(-1, k)
        target = noise_lib.soft_targets(classes, probs, num_classes, config.temperature)
    else:
        target = noise_lib.hard_targets(labels, num_classes, config.label_smoothing)
    rows = {"uri": batch.column("uri").to_numpy(zero_copy_only=False), "label": labels, "target": target}
    return noise_lib.load_pixels(
        rows,
        size=config.input_size,
        crop_pct=config.crop_pct,
        noise=config.noise if noised else None,
        mean=config.mean,
    )


def stream(
    ds: ray.data.Dataset, rows: int, rows_needed: int, config: TrainConfig, num_classes: int, *, seed: int
) -> ray.data.Dataset:
    """An endless-enough, noised stream of ``rows_needed`` rows over a dataset of ``rows`` (copies counted)."""
    times = max(1, math.ceil(rows_needed / max(rows, 1)))
    return (
        ds.randomize_block_order(seed=seed)
        .map_batches(_expand, batch_format="pyarrow", batch_size=None, fn_kwargs={"times": times})
        .map_batches(
            _prepare,
            batch_format="pyarrow",
            batch_size=PREPARE_BATCH_SIZE,
            fn_kwargs={"config": config, "num_classes": num_classes, "noised": True},
        )
    )


def evaluation(ds: ray.data.Dataset, config: TrainConfig, num_classes: int) -> ray.data.Dataset:
    return ds.map_batches(
        _prepare,
        batch_format="pyarrow",
        batch_size=PREPARE_BATCH_SIZE,
        fn_kwargs={"config": config, "num_classes": num_classes, "noised": False},
    )


def read_manifest(uri: str, columns: list[str]) -> ray.data.Dataset:
    fs, path = storage.resolve(uri)
    return ray.data.read_parquet(path, filesystem=fs, columns=columns)
