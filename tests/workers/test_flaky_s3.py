"""S3 that fails 10% of requests (503 SlowDown, 500 InternalError, connection resets, GET answers cut half-way;
``flaky_s3`` in tests/conftest.py): labeling, curation and training with every artifact on S3 finish with every
image exactly once, no image rejected for a fault of the store, and a missing object still ``missing``; a store
that keeps failing fails the task instead of rejecting its images, and the task runs again."""

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.s3proxy import Faults
from curation import imaging, sources, storage
from curation.balance import CurationConfig
from service import pipeline
from service.specs import GenerationSpec
from tests import s3
from tests.containers import write_webdataset
from tests.curation.test_balance import SPEC, curate_table, predictions
from tests.helpers import untrained_model, write_pool
from tests.service.test_pipeline import small
from tests.workers.test_curate import write_predictions
from trainer import data as trainer_data
from trainer import models, noise
from trainer.config import TrainConfig
from workers import labeling, ledger
from workers.config import LabelConfig
from workers.curate import curate
from workers.labeling import label, read_and_decode

FAULTS = ("slowdown", "internal", "reset", "truncate")


def read_s3_table(uri: str, columns=None) -> pa.Table:
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def write_s3_manifest(uri: str, uris: list[str]) -> None:
    fs, path = storage.resolve(uri)
    pq.write_table(
        pa.table(
            {"image_id": pa.array(sources.image_ids(uris), pa.int64()), "uri": pa.array(uris)},
            schema=sources.UNLABELED_SCHEMA,
        ),
        path,
        filesystem=fs,
    )


def test_decoding_rejects_only_what_is_missing_and_fails_when_the_store_stays_down(flaky_s3, tmp_path):
    bucket = s3.new_bucket()
    good, bad = write_pool(str(tmp_path / "pool"), good=40)
    s3.upload_folder(str(tmp_path / "pool"), bucket + "/pool")
    name = {p: f"{bucket}/pool/{os.path.basename(p)}" for p in good + list(bad)}
    missing = bucket + "/pool/never-written.png"
    uris = [name[p] for p in good] + [name[p] for p in bad] + [missing]
    batch = {"image_id": np.arange(len(uris)), "uri": np.array(uris, dtype=object)}

    out = read_and_decode(batch, size=32, crop_pct=1.0, read_concurrency=8)
    reasons = dict(zip(uris, out["reason"]))
    assert all(reasons[name[p]] == "" for p in good)
    assert {u: r for u, r in reasons.items() if r} == {**{name[p]: r for p, r in bad.items()}, missing: imaging.MISSING}
    assert sum(flaky_s3.counts[f] for f in FAULTS) >= 5, flaky_s3.counts

    with store_down_for_good(flaky_s3, then=Faults.mixed(0.10)):
        with pytest.raises(storage.StorageUnavailable, match="500"):
            read_and_decode(batch, size=32, crop_pct=1.0, read_concurrency=8)


@contextlib.contextmanager
def store_down_for_good(proxy, then: Faults | None = None) -> Iterator[None]:
    """Every S3 request answered 500, with 3 attempts a request (fewer than the default, so that a test of it is
    quick); then the proxy's faults are ``then`` (none by default) and the attempts the default again."""
    saved = storage.S3_MAX_ATTEMPTS
    storage.S3_MAX_ATTEMPTS = 3
    storage._filesystem.cache_clear()
    try:
        proxy.reset(Faults(internal=1.0))
        yield
    finally:
        proxy.reset(then)
        storage.S3_MAX_ATTEMPTS = saved
        storage._filesystem.cache_clear()


def test_a_manifest_the_store_keeps_failing_fails_its_read_task_as_unavailable(s3_proxy, tmp_path):
    """A read task whose manifest the store keeps failing raises StorageUnavailable (which Ray Data runs again),
    not the store's raw OSError (which fails the job)."""
    bucket = s3.new_bucket()
    manifest = bucket + "/pool.parquet"
    write_s3_manifest(manifest, [f"{bucket}/pool/{i}.jpg" for i in range(8)])
    plan = labeling._plan(manifest, sources.SourceFormat.MANIFEST, str(tmp_path / "labels"), LabelConfig())
    todo = np.ones(plan.num_shards, dtype=bool)
    units = plan.units(labeling.READ_UNIT_ROWS, todo)
    with store_down_for_good(s3_proxy):
        with pytest.raises(storage.StorageUnavailable, match="pool.parquet"):
            labeling.read_units(
                {"id": np.array([0])}, plan=plan, units=units, todo=todo, skip_ids=np.array([], dtype=np.int64)
            )


def test_a_generation_on_flaky_s3_loses_nothing_and_repeats_nothing(ray_cluster, flaky_s3, digits_root, tmp_path):
    """Labeling (Ray Data tasks reading images, writing Parquet and the ledger), curation (Ray Data reading
    predictions, writing the manifest and stats.json) and the student (Ray Train reading both, checkpoints,
    the model folder), all on S3 while 10% of its requests fail."""
    bucket = s3.new_bucket()
    s3.upload_folder(str(digits_root / "labeled"), bucket + "/labeled")
    s3.upload_folder(str(digits_root / "test"), bucket + "/test")
    pool = tmp_path / "pool"
    os.makedirs(pool)
    for name in sorted(os.listdir(digits_root / "unlabeled"))[:40]:
        os.link(digits_root / "unlabeled" / name, pool / name)
    _, bad = write_pool(str(pool), good=0)
    objects = s3.upload_folder(str(pool), bucket + "/unlabeled")
    missing = bucket + "/unlabeled/deleted-after-listing.png"
    source = objects + [missing]
    write_s3_manifest(bucket + "/pool.parquet", source)
    teacher = bucket + "/g0/model"
    untrained_model(teacher)

    spec = GenerationSpec(
        teacher=teacher,
        labeled=bucket + "/labeled",
        unlabeled=bucket + "/pool.parquet",
        eval=bucket + "/test",
        output=bucket + "/g1",
        student=small(4).model_copy(update={"checkpoint_every": 2}),
    )
    spec.label.batch_size, spec.label.shard_rows, spec.label.rows_per_file = 8, 16, 16
    spec.curation.confidence_floor = 0.0
    result = pipeline.run_generation(spec, "g1")

    # every source image exactly once across predictions and rejects
    preds = read_s3_table(result.labeling.predictions_uri, ["image_id", "uri"])
    rejects = read_s3_table(result.labeling.rejects_uri, ["uri", "reason"])
    seen = Counter(preds.column("uri").to_pylist() + rejects.column("uri").to_pylist())
    assert seen == Counter(source)
    # rejected: the bad files for their own reasons and the missing object, nothing for a fault of the store
    expected = {f"{bucket}/unlabeled/{os.path.basename(p)}": r for p, r in bad.items()}
    assert dict(zip(rejects.column("uri").to_pylist(), rejects.column("reason").to_pylist())) == {
        **expected,
        missing: imaging.MISSING,
    }
    assert result.labeling.predicted == 40 and result.labeling.images == len(source)
    assert storage.list_files(storage.join(spec.output, "labels", ledger.STAGING)) == []

    # the manifest: as many rows as the statistics say, each image once
    manifest = read_s3_table(result.dataset.manifest_uri, ["image_id", "copies"])
    stats = storage.read_json(bucket + "/g1/dataset/stats.json")
    assert manifest.num_rows == result.dataset.manifest_rows == stats["manifest_rows"] > 0
    assert len(set(manifest.column("image_id").to_pylist())) == manifest.num_rows
    assert set(manifest.column("image_id").to_pylist()) <= set(preds.column("image_id").to_pylist())
    assert stats["images_seen"] == len(source)

    # the student trained its steps, checkpointed on S3 and saved a model folder that loads
    student, meta = models.load(result.student.model_uri)
    assert not student.training and meta.metrics["test_images"] == 100
    assert any(u.endswith("/state.pt") for u in storage.list_files(bucket + "/g1/checkpoints"))
    assert all(flaky_s3.counts[f] > 0 for f in FAULTS), flaky_s3.counts


@contextlib.contextmanager
def outage_until_a_task_runs_again(proxy, paths_with: str = "") -> Iterator[list[int]]:
    """Every S3 request answered 500 until one request line has drawn more faults than one run of a task makes
    attempts (S3_MAX_ATTEMPTS): the task that made them failed with StorageUnavailable after its client's retries
    and ran again. Then the store comes back. Yields a list that holds that line's count once it happened.
    With ``paths_with``, only requests whose path contains it fail."""
    most: list[int] = []
    done = threading.Event()

    def end_outage_after_a_second_run() -> None:
        while not done.wait(0.1):
            counts = proxy.faulted.most_common(1)
            if counts and counts[0][1] > storage.S3_MAX_ATTEMPTS:
                most.append(counts[0][1])
                break
        proxy.reset()

    proxy.reset(Faults(internal=1.0, paths_with=paths_with))
    watcher = threading.Thread(target=end_outage_after_a_second_run, daemon=True)
    watcher.start()
    try:
        yield most
    finally:
        done.set()
        watcher.join()


def test_a_store_down_for_longer_than_a_tasks_retries_fails_the_task_which_runs_again(ray_cluster, s3_proxy, tmp_path):
    """Labeling through an outage that outlasts a decode task's client retries: the task runs again, and every
    image is labeled once, none rejected. The manifest, the teacher and the outputs are local, so that only the
    image reads meet the outage."""
    bucket = s3.new_bucket()
    good, _ = write_pool(str(tmp_path / "pool"), good=12)
    s3.upload_folder(str(tmp_path / "pool"), bucket + "/pool")
    uris = [f"{bucket}/pool/{os.path.basename(p)}" for p in good]
    manifest = str(tmp_path / "pool.parquet")
    pq.write_table(
        pa.table({"image_id": pa.array(sources.image_ids(uris), pa.int64()), "uri": pa.array(uris)}),
        manifest,
    )
    teacher = str(tmp_path / "teacher")
    untrained_model(teacher)

    with outage_until_a_task_runs_again(s3_proxy) as most:
        result = label(manifest, teacher, str(tmp_path / "labels"), LabelConfig(batch_size=4, decode_batch_size=4))
    assert most, "no request drew more faults than one run of its task makes attempts: no task ran twice"
    assert result.images == result.predicted == len(uris) and result.rejected == {}
    preds = pq.read_table(result.predictions_uri, columns=["uri"])
    assert Counter(preds.column("uri").to_pylist()) == Counter(uris)


def test_labeling_tar_shards_rides_out_a_store_down_for_longer_than_a_tasks_retries(ray_cluster, s3_proxy, tmp_path):
    """Labeling a WebDataset on S3 while its shards' reads fail for longer than a read task's client retries (the
    listing of the shards, the teacher and the outputs are not faulted): the read task fails with
    StorageUnavailable and runs again, and every image is labeled once, none rejected."""
    bucket = s3.new_bucket()
    _, labels, _ = write_webdataset(str(tmp_path / "wds"), 2, 4)
    s3.upload_folder(str(tmp_path / "wds"), bucket + "/wds")
    uris = [bucket + "/wds/" + os.path.relpath(u, tmp_path / "wds") for u in labels]
    teacher = str(tmp_path / "teacher")
    untrained_model(teacher)

    with outage_until_a_task_runs_again(s3_proxy, paths_with=".tar") as most:
        result = label(
            bucket + "/wds",
            teacher,
            str(tmp_path / "labels"),
            LabelConfig(batch_size=4, decode_batch_size=4),
            source_format="webdataset",
        )
    assert most, "no request drew more faults than one run of its task makes attempts: no task ran twice"
    assert result.images == result.predicted == len(uris) and result.rejected == {}
    preds = pq.read_table(result.predictions_uri, columns=["uri"])
    assert Counter(preds.column("uri").to_pylist()) == Counter(uris)


def test_labeling_outputs_ride_out_a_store_down_for_longer_than_a_tasks_retries(ray_cluster, s3_proxy, tmp_path):
    """Labeling into S3 while the writes of its predictions fail for longer than a write task's client retries
    (the images and the teacher are local; the ledger is not faulted): the write task fails with
    StorageUnavailable and runs again, and every image is labeled once; only the pool's bad files are rejected."""
    out = s3.new_bucket() + "/labels"
    good, bad = write_pool(str(tmp_path / "pool"), good=12)
    teacher = str(tmp_path / "teacher")
    untrained_model(teacher)

    with outage_until_a_task_runs_again(s3_proxy, paths_with="/predictions/part-") as most:
        result = label(str(tmp_path / "pool"), teacher, out, LabelConfig(batch_size=4, decode_batch_size=4))
    assert most, "no request drew more faults than one run of its task makes attempts: no task ran twice"
    assert result.predicted == len(good) and sum(result.rejected.values()) == len(bad)
    assert result.images == len(good) + len(bad)
    preds = read_s3_table(result.predictions_uri, columns=["uri"])
    assert Counter(preds.column("uri").to_pylist()) == Counter(good)


def test_curation_rides_out_a_store_down_for_longer_than_a_tasks_retries(ray_cluster, s3_proxy, tmp_path):
    """Curating predictions on S3 while the store keeps failing their reads for longer than a task's client
    retries (the listing and the outputs are not faulted): the read task runs again, and the manifest is the one
    curated without faults."""
    table = predictions(SPEC)
    write_predictions(table, str(tmp_path / "preds"), files=3)
    bucket = s3.new_bucket()
    s3.upload_folder(str(tmp_path / "preds"), bucket + "/preds")
    config = CurationConfig(images_per_class=100, seed=11)

    with outage_until_a_task_runs_again(s3_proxy, paths_with="/preds/part-") as most:
        stats = curate(bucket + "/preds", str(tmp_path / "ds"), ["a", "b", "c", "d"], config)
    assert most, "no request drew more faults than one run of its task makes attempts: no task ran twice"
    _, reference = curate_table(table, config, 4)
    got = pq.read_table(stats.manifest_uri, columns=["image_id", "label", "copies"]).sort_by("image_id")
    assert got.equals(reference.select(["image_id", "label", "copies"]).sort_by("image_id"))


@pytest.mark.parametrize("by_container", [False, True], ids=["objects", "tar-shards"])
def test_training_data_rides_out_a_store_down_for_longer_than_a_tasks_retries(
    ray_cluster, s3_proxy, tmp_path, by_container
):
    """Training's evaluation stream through the same outage, from S3 objects and from tar shards on S3 (decoded a
    shard at a time after a grouping): the task runs again, and every image comes out once, none skipped."""
    bucket = s3.new_bucket()
    if by_container:
        _, labels, _ = write_webdataset(str(tmp_path / "wds"), 2, 4)
        s3.upload_folder(str(tmp_path / "wds"), bucket + "/wds")
        uris = [bucket + "/wds/" + os.path.relpath(u, tmp_path / "wds") for u in labels]
    else:
        good, _ = write_pool(str(tmp_path / "pool"), good=8)
        s3.upload_folder(str(tmp_path / "pool"), bucket + "/pool")
        uris = [f"{bucket}/pool/{os.path.basename(p)}" for p in good]
    manifest = pa.table({"uri": uris, "label": pa.array(range(len(uris)), pa.int32())})  # a class per image
    config = TrainConfig(architecture="test_resnet", input_size=16)

    with outage_until_a_task_runs_again(s3_proxy) as most:
        ds = trainer_data.evaluation(
            ray_cluster.data.from_arrow(manifest), config, len(uris), by_container=by_container
        )
        out = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    assert most, "no request drew more faults than one run of its task makes attempts: no task ran twice"
    assert (np.concatenate([b[noise.SKIP] for b in out]) == noise.KEPT).all()
    assert sorted(np.concatenate([b["label"] for b in out]).tolist()) == list(range(len(uris)))


def test_curation_writes_its_manifest_through_a_store_down_for_longer_than_a_clients_retries(
    ray_cluster, s3_proxy, tmp_path
):
    """Curating into S3 while the writes of the manifest's files fail for longer than one write's client retries
    (the predictions are local; the driver's clearing of the manifest folder and stats.json are not faulted):
    Ray Data's Parquet writer makes the write again (DataContext.retried_io_errors lists S3's internal
    failure), and the manifest is the one curated without faults, each row once."""
    table = predictions(SPEC)
    write_predictions(table, str(tmp_path / "preds"), files=3)
    out = s3.new_bucket() + "/ds"
    config = CurationConfig(images_per_class=100, seed=11)

    with outage_until_a_task_runs_again(s3_proxy, paths_with="/ds/manifest/") as most:
        stats = curate(str(tmp_path / "preds"), out, ["a", "b", "c", "d"], config)
    assert most, "no request drew more faults than one write makes attempts: no write was made again"
    _, reference = curate_table(table, config, 4)
    got = read_s3_table(stats.manifest_uri, columns=["image_id", "label", "copies"]).sort_by("image_id")
    assert got.equals(reference.select(["image_id", "label", "copies"]).sort_by("image_id"))
    assert stats.manifest_rows == reference.num_rows
