"""Curation on Ray Data: two streaming passes over the predictions, never all rows on one node.

Pass 1 sums per-class confidence histograms block by block; only (classes x 100) counts reach the driver.
Pass 2 assigns copies per row (a pure function of the row, the plan and the seed), writes the manifest,
and sums what was written per class.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from curation import balance
from curation.balance import CurationConfig
from curation.stats import ClassStats, DatasetStats, config_hash
from service import storage


def _histogram_block(batch: pa.Table, *, num_classes: int) -> pa.Table:
    hist = balance.class_histogram(
        batch.column("label").to_numpy(), batch.column("confidence").to_numpy(), num_classes
    )
    return pa.table({"hist": pa.FixedSizeListArray.from_arrays(pa.array(hist.ravel()), hist.size)})


def _written_block(batch: pa.Table, *, num_classes: int) -> pa.Table:
    labels = batch.column("label").to_numpy().astype(np.int64)
    copies = batch.column("copies").to_numpy()
    kept = np.bincount(labels, minlength=num_classes)
    rows = np.bincount(labels, weights=copies, minlength=num_classes).astype(np.int64)
    digest = balance.rows_digest(batch.column("image_id").to_numpy(), labels, copies)
    return pa.table(
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
    fs, path = storage.resolve(predictions_uri)
    preds = ray.data.read_parquet(path, filesystem=fs)

    hist = _sum_blocks(
        preds.select_columns(["label", "confidence"]).map_batches(
            _histogram_block, batch_format="pyarrow", fn_kwargs={"num_classes": num_classes}, batch_size=None
        ),
        {"hist": (num_classes, balance.NUM_BINS)},
    )["hist"]
    plan = balance.plan(hist, config)

    manifest_uri = storage.join(out_uri, "manifest")
    mfs, mpath = storage.resolve(manifest_uri)
    mfs.delete_dir_contents(mpath, missing_dir_ok=True)  # a re-run replaces, never appends
    preds.map_batches(
        balance.assign_copies, batch_format="pyarrow", fn_kwargs={"plan": plan, "seed": config.seed}, batch_size=None
    ).write_parquet(mpath, filesystem=mfs)

    if storage.list_files(manifest_uri, suffix=".parquet"):
        written = ray.data.read_parquet(mpath, filesystem=mfs, columns=["image_id", "label", "copies"]).map_batches(
            _written_block, batch_format="pyarrow", fn_kwargs={"num_classes": num_classes}, batch_size=None
        )
        sums = _sum_blocks(written, {"kept": (num_classes,), "copies": (num_classes,), "digest": ()})
        kept, copies, digest = sums["kept"], sums["copies"], int(sums["digest"])
    else:  # nothing passed the floor: an empty manifest, reported as such
        kept, copies, digest = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64), 0

    floor_bin = int(balance.confidence_bins(np.array([config.confidence_floor], dtype=np.float32))[0])
    rejected = rejected or {}
    decoded = int(hist.sum())
    stats = DatasetStats(
        dataset_id=dataset_id,
        images_seen=decoded + sum(rejected.values()),
        images_decoded=decoded,
        rejected=rejected,
        images_per_class=plan.images_per_class,
        classes=[
            ClassStats(
                class_index=c,
                class_name=class_names[c],
                predicted=int(hist[c].sum()),
                above_floor=int(hist[c, floor_bin:].sum()),
                threshold=float(plan.thresholds[c]),
                eligible=int(plan.eligible[c]),
                kept=int(kept[c]),
                copies=int(copies[c]),
            )
            for c in range(num_classes)
        ],
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
    storage.write_json(storage.join(out_uri, "stats.json"), stats.model_dump(mode="json"))
    return stats
