"""Every artifact on s3:// (moto's S3 server on loopback, over HTTP): images, models, predictions, manifests,
statistics, checkpoints."""

import os

import pyarrow.parquet as pq
import pytest
import torch

from curation import schema, storage
from curation.balance import CurationConfig
from service import digits, pipeline
from service.specs import GenerationSpec
from tests import s3
from tests.curation.test_balance import curate_table
from tests.helpers import untrained_model, write_pool
from tests.service.test_pipeline import small
from trainer import models
from workers import ledger
from workers.curate import curate
from workers.labeling import LabelConfig, label


def every(config, steps: int):
    return config.model_copy(update={"checkpoint_every": steps})


def read_s3_table(uri: str, columns=None):
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def test_ray_workers_reach_the_same_s3(ray_cluster, s3_server):
    @ray_cluster.remote
    def settings():
        from curation import storage

        bucket = s3.new_bucket("nst-worker")
        storage.write_bytes(bucket + "/from-worker.txt", b"hello")
        return os.environ.get("AWS_ENDPOINT_URL"), storage.s3_endpoint(), bucket

    env, endpoint, bucket = ray_cluster.get(settings.remote())
    assert env == endpoint == s3_server
    assert storage.read_bytes(bucket + "/from-worker.txt") == b"hello"


def test_model_folder_round_trip_on_s3(tmp_path):
    uri = s3.new_bucket() + "/models/teacher"
    meta = untrained_model(uri)
    assert sorted(storage.list_files(uri)) == [f"{uri}/{models.META}", f"{uri}/{models.WEIGHTS}"]
    model, loaded = models.load(uri)
    assert loaded == meta and not model.training
    reference = models.create(meta)
    reference.load_state_dict(model.state_dict())
    x = torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.equal(model(models.normalize(x, meta)), reference.eval()(models.normalize(x, meta)))
    with pytest.raises(ValueError, match="not a model folder"):
        models.load_meta(uri + "-missing")


def test_labeling_and_curation_all_on_s3(ray_cluster, tmp_path):
    bucket = s3.new_bucket()
    good, bad = write_pool(str(tmp_path / "pool"), good=95)
    uploaded = s3.upload_folder(str(tmp_path / "pool"), bucket + "/pool")
    to_s3 = {p: f"{bucket}/pool/{os.path.basename(p)}" for p in good + list(bad)}
    assert sorted(to_s3.values()) == uploaded
    teacher = bucket + "/models/teacher"
    untrained_model(teacher)
    out = bucket + "/labels"

    result = label(
        bucket + "/pool",
        teacher,
        out,
        LabelConfig(top_k=3, batch_size=16, shard_rows=30, rows_per_file=40),
        teacher_id="gen-0",
    )
    assert result.predictions_uri == out + "/predictions"
    assert result.images == 100 and result.predicted == 95 and result.resumed == 0
    preds = read_s3_table(result.predictions_uri)
    rejects = read_s3_table(result.rejects_uri)
    assert preds.schema.equals(schema.PREDICTIONS) and rejects.schema.equals(schema.REJECTS)
    assert sorted(preds.column("uri").to_pylist()) == sorted(to_s3[p] for p in good)
    assert dict(zip(rejects.column("uri").to_pylist(), rejects.column("reason").to_pylist())) == {
        to_s3[p]: reason for p, reason in bad.items()
    }
    assert storage.exists(out + "/source.parquet") and storage.exists(out + "/labeling.json")
    assert storage.read_json(out + "/labeling.json")["predicted"] == 95
    assert storage.list_files(out + "/" + ledger.STAGING) == []
    assert len(storage.list_files(out + "/" + ledger.LEDGER)) >= 1

    # run again: everything is committed, nothing is labeled twice
    again = label(
        bucket + "/pool",
        teacher,
        out,
        LabelConfig(top_k=3, batch_size=16, shard_rows=30, rows_per_file=40),
        teacher_id="gen-0",
    )
    assert again.resumed == 100 and again.predicted == 95
    assert read_s3_table(result.predictions_uri).num_rows == 95

    config = CurationConfig(confidence_floor=0.0, images_per_class=20, seed=3)
    stats = curate(
        result.predictions_uri,
        bucket + "/dataset",
        [str(c) for c in range(10)],
        config,
        dataset_id="s3",
        rejected=result.rejected,
    )
    assert stats.manifest_uri == bucket + "/dataset/manifest"
    manifest = read_s3_table(stats.manifest_uri)
    assert manifest.schema.equals(schema.MANIFEST)
    _, reference = curate_table(preds, config, 10)
    got = manifest.select(["image_id", "label", "copies"]).sort_by("image_id")
    assert got.equals(reference.select(["image_id", "label", "copies"]).sort_by("image_id"))
    on_s3 = storage.read_json(bucket + "/dataset/stats.json")
    assert on_s3["manifest_checksum"] == stats.manifest_checksum and on_s3["images_seen"] == 100
    assert on_s3["rejected"] == result.rejected


@pytest.mark.slow
def test_a_generation_with_every_artifact_on_s3(ray_cluster, tmp_path):
    """Labeling, curation, student training with its checkpoints, model folders: all on S3."""
    data = digits.write(str(tmp_path / "digits"), labeled_per_class=5, test_per_class=10, validation_per_class=0)
    bucket = s3.new_bucket()
    s3.upload_folder(data["labeled"], bucket + "/labeled")
    s3.upload_folder(data["test"], bucket + "/test")
    os.makedirs(tmp_path / "pool")
    for name in sorted(os.listdir(data["unlabeled"]))[:300]:
        os.link(os.path.join(data["unlabeled"], name), tmp_path / "pool" / name)
    s3.upload_folder(str(tmp_path / "pool"), bucket + "/unlabeled")
    teacher = bucket + "/g0/model"
    untrained_model(teacher)

    spec = GenerationSpec(
        teacher=teacher,
        labeled=bucket + "/labeled",
        unlabeled=bucket + "/unlabeled",
        eval=bucket + "/test",
        output=bucket + "/g1",
        student=every(small(6), 3),
    )
    spec.curation.confidence_floor = 0.0
    result = pipeline.run_generation(spec, "g1")
    assert result.labeling.predicted == 300 and result.labeling.predictions_uri == bucket + "/g1/labels/predictions"
    assert result.dataset.manifest_uri == bucket + "/g1/dataset/manifest" and result.dataset.manifest_rows > 0
    assert read_s3_table(result.dataset.manifest_uri).num_rows == result.dataset.manifest_rows
    assert result.student.model_uri == bucket + "/g1/model"
    student, meta = models.load(result.student.model_uri)
    assert meta.metrics["test_images"] == 100 and not student.training
    assert storage.read_json(bucket + "/g1/generation.json")["labeling"]["predicted"] == 300
    assert any(u.endswith("/state.pt") for u in storage.list_files(bucket + "/g1/checkpoints"))

    # training again resumes from the last checkpoint on S3: nothing is left to train
    again, _ = pipeline.student_stage(spec, result.dataset)
    assert again.metrics["resumed_from_step"] == 6
