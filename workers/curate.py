"""Curation on Ray Data: two streaming passes over the predictions, never all rows on one node.

Pass 1 sums per-class confidence histograms; only (classes x 100) counts per read unit reach the driver.
Pass 2 assigns copies per row (a pure function of the row, the plan and the seed), writes the manifest,
and sums what was written per class.

The Parquet files are read by the project's own tasks (``curation.tables``), each streaming whole files in
tables of ``tables.BATCH_ROWS`` rows, rather than by ``ray.data.read_parquet``: Ray 2.60's reader first reads
every footer on a pool of 32 actors (a process each, even on a 2-CPU node) and bin-packs row groups into
128 MiB blocks, which on a small node doubles the peak memory and halves the throughput (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray

from curation import balance, storage, tables
from curation.balance import CurationConfig
from curation.layout import MANIFEST, STATS
from curation.stats import ClassStats, DatasetStats, config_hash


def _unit_histogram(files: list[str], *, num_classes: int) -> Iterator[pa.Table]:
    hist = np.zeros((num_classes, balance.NUM_BINS), dtype=np.int64)
    for table in tables.tables(files, ["label", "confidence"]):
        hist += balance.class_histogram(
            table.column("label").to_numpy(), table.column("confidence").to_numpy(), num_classes
        )
    yield pa.table({"hist": pa.FixedSizeListArray.from_arrays(pa.array(hist.ravel()), hist.size)})


def _unit_manifest(files: list[str], *, plan: balance.Plan, seed: int) -> Iterator[pa.Table]:
    for table in tables.tables(files, None):
        kept = balance.assign_copies(table, plan, seed)
        if kept.num_rows:
            yield kept


def _unit_written(files: list[str], *, num_classes: int) -> Iterator[pa.Table]:
    kept = np.zeros(num_classes, dtype=np.int64)
    rows = np.zeros(num_classes, dtype=np.int64)
    digest = 0
    for table in tables.tables(files, ["image_id", "label", "copies"]):
        labels = table.column("label").to_numpy().astype(np.int64)
        copies = table.column("copies").to_numpy()
        kept += np.bincount(labels, minlength=num_classes)
        rows += np.bincount(labels, weights=copies, minlength=num_classes).astype(np.int64)
        digest = (digest + balance.rows_digest(table.column("image_id").to_numpy(), labels, copies)) % 2**64
    yield pa.table(
        {
            "kept": pa.FixedSizeListArray.from_arrays(pa.array(kept), num_classes),
            "copies": pa.FixedSizeListArray.from_arrays(pa.array(rows), num_classes),
            "digest": pa.array([digest], pa.uint64()),
        }
    )


def _sum_blocks(ds: ray.data.Dataset, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Column by column, the sum over every row of every block, each to ``shapes[column]``; only one block is
    held at a time. A fixed-size-list column is summed element-wise; uint64 columns wrap modulo 2**64."""
    totals = {name: np.zeros(shape, dtype=np.int64) for name, shape in shapes.items()}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        assert isinstance(batch, pa.Table)  # batch_format="pyarrow"
        for name, shape in shapes.items():
            column = batch.column(name).combine_chunks()
            values = (column.flatten() if pa.types.is_fixed_size_list(column.type) else column).to_numpy()
            part = values.reshape(-1, *shape).sum(axis=0, dtype=values.dtype)
            with np.errstate(over="ignore"):
                totals[name] = totals[name].astype(values.dtype) + part
    return totals


def curate(
    predictions_uri: str,
    out_uri: str,
    class_names: list[str],
    config: CurationConfig | None = None,
    *,
    dataset_id: str = "",
    rejected: dict[str, int] | None = None,
    teacher: str = "",
) -> DatasetStats:
    """Filter and balance ``predictions_uri`` into ``<out>/manifest``; write ``<out>/stats.json``."""
    config = config or CurationConfig()
    num_classes = len(class_names)
    units = tables.read_units(predictions_uri)  # none when every image was rejected: an empty manifest
    hist = _histogram(units, num_classes)
    plan = balance.plan(hist, config)
    manifest_uri = storage.join(out_uri, MANIFEST)
    _write_manifest(units, manifest_uri, plan, config.seed)
    kept, copies, digest = _count_written(manifest_uri, num_classes)
    rejected = rejected or {}
    decoded = int(hist.sum())
    stats = DatasetStats(
        dataset_id=dataset_id,
        images_seen=decoded + sum(rejected.values()),
        images_decoded=decoded,
        rejected=rejected,
        images_per_class=plan.images_per_class,
        classes=_class_stats(class_names, hist, plan, kept, copies, config.confidence_floor),
        confidence_histogram=hist.sum(axis=0).tolist(),
        config=config,
        config_hash=config_hash(config, predictions=predictions_uri),
        manifest_uri=manifest_uri,
        manifest_rows=int(kept.sum()),
        manifest_copies=int(copies.sum()),
        manifest_checksum=f"{digest:016x}",
        predictions_uri=predictions_uri,
        teacher=teacher,
    )
    storage.write_json(storage.join(out_uri, STATS), stats.model_dump(mode="json"))
    return stats


def _histogram(units: list[list[str]], num_classes: int) -> np.ndarray:
    """Pass 1: the confidence histogram of each predicted class, summed over the prediction files."""
    if not units:
        return np.zeros((num_classes, balance.NUM_BINS), dtype=np.int64)
    blocks = tables.over_units(units, _unit_histogram, num_classes=num_classes)
    return _sum_blocks(blocks, {"hist": (num_classes, balance.NUM_BINS)})["hist"]


def _write_manifest(units: list[list[str]], manifest_uri: str, plan: balance.Plan, seed: int) -> None:
    """Pass 2: each prediction file's rows that pass the plan, with their copies, into the manifest (which a
    re-run replaces, never appends to)."""
    mfs, mpath = storage.resolve(manifest_uri)
    mfs.delete_dir_contents(mpath, missing_dir_ok=True)
    if units:
        tables.over_units(units, _unit_manifest, plan=plan, seed=seed).write_parquet(mpath, filesystem=mfs)


def _count_written(manifest_uri: str, num_classes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Pass 3, over what was written: rows and copies per class, and the manifest's order-free digest."""
    written_units = tables.read_units(manifest_uri)
    if not written_units:  # nothing passed the floor: an empty manifest, reported as such
        return np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64), 0
    sums = _sum_blocks(
        tables.over_units(written_units, _unit_written, num_classes=num_classes),
        {"kept": (num_classes,), "copies": (num_classes,), "digest": ()},
    )
    return sums["kept"], sums["copies"], int(sums["digest"])


def _class_stats(
    class_names: list[str],
    hist: np.ndarray,
    plan: balance.Plan,
    kept: np.ndarray,
    copies: np.ndarray,
    confidence_floor: float,
) -> list[ClassStats]:
    floor_bin = int(balance.confidence_bins(np.array([confidence_floor], dtype=np.float32))[0])
    return [
        ClassStats(
            class_index=c,
            class_name=name,
            predicted=int(hist[c].sum()),
            above_floor=int(hist[c, floor_bin:].sum()),
            threshold=float(plan.thresholds[c]),
            eligible=int(plan.eligible[c]),
            kept=int(kept[c]),
            copies=int(copies[c]),
            confidence_histogram=hist[c].tolist(),
        )
        for c, name in enumerate(class_names)
    ]
