"""A labeling job killed in the middle and run again labels every image exactly once."""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from curation import sources, storage
from tests.helpers import kill_process_tree, untrained_model, write_pool
from workers import ledger
from workers.labeling import LabelConfig, label

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def labeled_ids(out: str) -> Counter:
    """How many times each image id is in the predictions and the rejects."""
    ids: Counter = Counter()
    for part in (ledger.PREDICTIONS, ledger.REJECTS):
        for uri in storage.list_files(storage.join(out, part), suffix=".parquet"):
            ids.update(pq.read_table(uri, columns=["image_id"]).column("image_id").to_pylist())
    return ids


def source_ids(paths) -> Counter:
    return Counter(sources.image_id(p) for p in paths)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("teacher") / "model")
    untrained_model(uri)
    return uri


def test_lost_commits_are_relabeled_once(ray_cluster, tmp_path, teacher):
    good, bad = write_pool(str(tmp_path / "pool"), good=295)
    out = str(tmp_path / "labels")
    config = LabelConfig(top_k=3, batch_size=16, shard_rows=20, rows_per_file=40)
    first = label(str(tmp_path / "pool"), teacher, out, config, teacher_id="t")
    assert first.images == 300 and first.predicted == 295 and first.resumed == 0
    assert labeled_ids(out) == source_ids(good + list(bad))
    entries = storage.list_files(storage.join(out, ledger.LEDGER))
    assert len(entries) >= 3

    # As if the job had died: two tasks moved their files but never wrote their ledger entries, and one
    # was killed while staging.
    lost = entries[:2]
    for uri in lost:
        storage.delete_file(uri)
    storage.write_bytes(storage.join(out, ledger.STAGING, "predictions", "part-x.parquet"), b"partial")
    stale = os.path.getmtime(os.path.join(out, "source.parquet"))

    again = label(str(tmp_path / "pool"), teacher, out, config, teacher_id="t")
    assert labeled_ids(out) == source_ids(good + list(bad))  # each id exactly once
    assert (again.images, again.predicted, again.rejected) == (first.images, first.predicted, first.rejected)
    assert 0 < again.resumed < 300
    assert os.path.getmtime(os.path.join(out, "source.parquet")) == stale  # the folder was not listed again
    assert storage.list_files(storage.join(out, ledger.STAGING)) == []

    # another teacher into the same folder: the old outputs are cleared, never mixed with the new
    other = label(str(tmp_path / "pool"), teacher, out, config, teacher_id="t2")
    assert other.resumed == 0 and other.images == 300
    assert labeled_ids(out) == source_ids(good + list(bad))
    teachers = set()
    for uri in storage.list_files(storage.join(out, ledger.PREDICTIONS)):
        teachers |= set(pq.read_table(uri, columns=["teacher"]).column("teacher").to_pylist())
    assert teachers == {"t2"}


JOB = textwrap.dedent(
    """
    import sys
    from service import cluster
    from workers.labeling import LabelConfig, label

    source, model, out, temp_dir = sys.argv[1:5]
    cluster.connect("local", num_cpus=2, temp_dir=temp_dir)
    label(source, model, out, LabelConfig(top_k=3, batch_size=8, shard_rows=40, rows_per_file=40), teacher_id="t")
    print("FINISHED", flush=True)
    """
)


def test_job_killed_with_sigkill_resumes_exactly_once(ray_cluster, tmp_path, teacher):
    good, bad = write_pool(str(tmp_path / "pool"), good=2395)
    source = str(tmp_path / "pool")
    out = str(tmp_path / "labels")
    temp_dir = tempfile.mkdtemp(prefix="nst-kill-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-c", JOB, source, teacher, out, temp_dir],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while len(storage.list_files(storage.join(out, ledger.LEDGER))) < 2:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "the job wrote nothing in 5 minutes"
            time.sleep(0.05)
    finally:
        kill_process_tree(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    killed_at = labeled_ids(out)
    assert 0 < sum(killed_at.values()) < 2400, "the job was to be killed in the middle"

    result = label(
        source, teacher, out, LabelConfig(top_k=3, batch_size=8, shard_rows=40, rows_per_file=40), teacher_id="t"
    )
    assert labeled_ids(out) == source_ids(good + list(bad))
    assert result.images == 2400 and result.predicted == 2395 and sum(result.rejected.values()) == 5
    assert 0 < result.resumed < 2400
    preds = pq.read_table(result.predictions_uri)
    assert preds.num_rows == 2395 and sorted(preds.column("uri").to_pylist()) == sorted(good)
