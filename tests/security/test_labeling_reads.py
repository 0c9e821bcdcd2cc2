"""A manifest inside an allowed root that names files outside it, devices, FIFOs and other buckets: the labeling
job rejects each row with its reason and opens none of them; the images inside the roots are labeled."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import access
from curation.errors import UserError
from tests.helpers import untrained_model, write_pool
from workers.config import LabelConfig
from workers.labeling import label


def test_a_hostile_manifest_is_rejected_row_by_row(ray_cluster, tmp_path):
    root = tmp_path / "root"
    good, _ = write_pool(str(root / "pool"), good=6)
    outside_image = tmp_path / "elsewhere" / "secret.png"
    os.makedirs(outside_image.parent)
    outside_image.write_bytes(open(good[0], "rb").read())
    os.mkfifo(root / "pool" / "fifo.png")
    os.symlink(outside_image, root / "pool" / "link.png")
    big = root / "pool" / "big.png"
    big.write_bytes(open(good[1], "rb").read() + b"\0" * 4096)
    expected = {
        "/etc/shadow": "outside_roots",
        "/proc/self/environ": "outside_roots",
        "file:///etc/hostname": "outside_roots",
        "s3://another-bucket/pool/x.png": "outside_roots",
        str(outside_image): "outside_roots",
        str(root / "pool" / "link.png"): "outside_roots",
        "/dev/zero": "outside_roots",  # outside the roots comes first
        str(root / "pool" / "fifo.png"): "not_regular_file",
        str(big): "too_large",
        str(root / "pool" / "missing.png"): "missing",
    }
    manifest = root / "manifest.parquet"
    pq.write_table(pa.table({"uri": [*good, *expected]}), manifest)
    teacher = str(root / "teacher")
    untrained_model(teacher)
    roots = [access.normalize(str(root))]
    config = LabelConfig(top_k=2, batch_size=8, decode={"max_file_bytes": 4000})
    result = label(str(manifest), teacher, str(tmp_path / "labels"), config, roots=roots)

    predictions = pq.read_table(result.predictions_uri).column("uri").to_pylist()
    rejects = pq.read_table(result.rejects_uri)
    assert sorted(predictions) == sorted(good)
    assert dict(zip(rejects.column("uri").to_pylist(), rejects.column("reason").to_pylist(), strict=True)) == expected

    # A source or a teacher outside the roots is a user error, before anything is read.
    with pytest.raises(UserError, match="may not be read"):
        label(str(manifest), str(outside_image.parent), str(tmp_path / "labels-2"), config, roots=roots)
