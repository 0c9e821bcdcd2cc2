import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import balance, schema
from curation.balance import CurationConfig
from tests.curation.test_balance import SPEC, curate_table, predictions
from workers.curate import curate


def write_predictions(table: pa.Table, folder: str, files: int) -> None:
    """Predictions in several Parquet files, as the labeling job leaves them."""
    os.makedirs(folder)
    n = table.num_rows
    full = pa.table(
        {
            "image_id": table.column("image_id"),
            "uri": table.column("uri"),
            "label": table.column("label"),
            "confidence": table.column("confidence"),
            "topk_classes": pa.array(
                [[c, (c + 1) % 4] for c in table.column("label").to_pylist()], pa.list_(pa.int32())
            ),
            "topk_probs": pa.array(
                [[p, 1 - p] for p in table.column("confidence").to_pylist()], pa.list_(pa.float16())
            ),
            "teacher": pa.array(["t"] * n),
        },
        schema=schema.PREDICTIONS,
    )
    step = -(-n // files)
    for i in range(files):
        pq.write_table(full.slice(i * step, step), os.path.join(folder, f"part-{i}.parquet"))


def test_curation_job_matches_the_reference_and_reports_stats(ray_cluster, tmp_path):
    table = predictions(SPEC)
    write_predictions(table, str(tmp_path / "preds"), files=5)
    config = CurationConfig(images_per_class=100, seed=11)
    stats = curate(
        str(tmp_path / "preds"),
        str(tmp_path / "ds"),
        ["a", "b", "c", "d"],
        config,
        dataset_id="ds-1",
        rejected={"corrupt": 2},
    )

    manifest = pq.read_table(stats.manifest_uri)
    assert manifest.schema.equals(schema.MANIFEST)
    _, reference = curate_table(table, config, 4)
    got = manifest.select(["image_id", "label", "copies"]).sort_by("image_id")
    assert got.equals(reference.select(["image_id", "label", "copies"]).sort_by("image_id"))

    labels, copies = reference.column("label").to_numpy(), reference.column("copies").to_numpy()
    assert stats.images_seen == table.num_rows + 2 and stats.images_decoded == table.num_rows
    assert stats.rejected == {"corrupt": 2}
    assert stats.images_per_class == 100
    assert [c.predicted for c in stats.classes] == [25, 400, 210, 100]
    assert [c.above_floor for c in stats.classes] == [25, 400, 210, 0]
    assert [c.threshold for c in stats.classes] == [0.30, 0.95, 0.80, 0.30]
    assert [c.eligible for c in stats.classes] == [25, 400, 110, 0]
    assert [c.kept for c in stats.classes] == np.bincount(labels, minlength=4).tolist()
    assert [c.copies for c in stats.classes] == np.bincount(labels, weights=copies, minlength=4).astype(int).tolist()
    assert stats.classes[0].copies == 100
    assert stats.manifest_rows == reference.num_rows and stats.manifest_copies == int(copies.sum())
    assert sum(stats.confidence_histogram) == table.num_rows
    assert stats.confidence_histogram[95] == 400 and stats.confidence_histogram[20] == 80
    # Each class's own histogram (the dashboard draws it with the threshold): they add up to the overall one.
    assert [sum(c.confidence_histogram) for c in stats.classes] == [c.predicted for c in stats.classes]
    assert np.sum([c.confidence_histogram for c in stats.classes], axis=0).tolist() == stats.confidence_histogram
    assert stats.classes[1].confidence_histogram[95] == 400
    digest = balance.rows_digest(reference.column("image_id").to_numpy(), labels, copies)
    assert stats.manifest_checksum == f"{digest:016x}"
    on_disk = json.loads((tmp_path / "ds" / "stats.json").read_text())
    assert on_disk["manifest_checksum"] == stats.manifest_checksum and on_disk["config"]["seed"] == 11

    # re-running replaces the manifest: same rows, same checksum, no appended duplicates
    again = curate(str(tmp_path / "preds"), str(tmp_path / "ds"), ["a", "b", "c", "d"], config)
    assert again.manifest_checksum == stats.manifest_checksum
    assert pq.read_table(again.manifest_uri).num_rows == reference.num_rows
