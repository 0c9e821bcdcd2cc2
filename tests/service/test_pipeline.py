"""A whole generation on real digits, small: teacher -> labels -> curation -> student -> next teacher."""

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from curation import sources
from curation.errors import UserError
from service import digits, pipeline
from service.specs import GenerationSpec
from trainer import models, robustness
from trainer.config import FinetuneConfig, TrainConfig
from trainer.models import ModelMeta


def small(steps: int, **kw) -> TrainConfig:
    kw.setdefault("architecture", "test_resnet")
    return TrainConfig(
        input_size=32,
        mean=(0.13,) * 3,
        std=(0.31,) * 3,
        steps=steps,
        batch_size=16,
        unlabeled_ratio=2,
        warmup_steps=2,
        checkpoint_every=10,
        **kw,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return digits.write(str(tmp_path_factory.mktemp("digits")), labeled_per_class=5, test_per_class=20)


def test_demo_splits_are_disjoint_and_sized(data):
    labeled, names = sources.labeled_source(data["labeled"])
    test, _ = sources.labeled_source(data["test"], names)
    validation, _ = sources.labeled_source(data["validation"], names)
    pool = sources.unlabeled_manifest(data["unlabeled"])
    assert names == [str(d) for d in range(10)]
    assert labeled.num_rows == 50 and test.num_rows == 200 and validation.num_rows == 100
    assert pool.num_rows == 5000 - 350

    def files(t):
        return {os.path.basename(u) for u in t.column("uri").to_pylist()}

    splits = [files(t) for t in (labeled, test, validation, pool)]
    assert sum(len(s) for s in splits) == len(set().union(*splits)) == 5000
    assert pq.read_table(data["unlabeled_truth"]).num_rows == pool.num_rows


def test_the_seed_changes_which_digits_are_labeled(data, tmp_path):
    other = digits.write(str(tmp_path), labeled_per_class=5, test_per_class=20, seed=1)

    def labeled(paths):
        return {os.path.basename(u) for u in sources.labeled_source(paths["labeled"])[0].column("uri").to_pylist()}

    assert len(labeled(other)) == len(labeled(data)) == 50 and labeled(other) != labeled(data)


def test_generation_end_to_end_and_student_becomes_teacher(ray_cluster, data, tmp_path):
    teacher = pipeline.train_teacher(small(30), labeled=data["labeled"], eval=data["test"], output=str(tmp_path / "g0"))
    meta = models.load_meta(teacher.model_uri)
    assert meta.architecture == "test_resnet" and meta.class_names == [str(d) for d in range(10)]
    assert meta.metrics["test_images"] == 200 and 0.0 <= meta.metrics["test_accuracy"] <= 1.0
    assert meta.config["steps"] == 30
    assert "validation_accuracy" not in meta.metrics  # no validation split given: none evaluated

    spec = GenerationSpec(
        teacher=teacher.model_uri,
        labeled=data["labeled"],
        unlabeled=data["unlabeled"],
        eval=data["test"],
        validation=data["validation"],
        output=str(tmp_path / "g1"),
        student=small(20),
    )
    spec.curation.confidence_floor = 0.0  # a 30-step teacher is not confident; keep every label
    result = pipeline.run_generation(spec, "g1")
    assert result.labeling.predicted == 4650 and result.labeling.rejected == {}
    assert result.dataset.images_seen == 4650 and result.dataset.manifest_rows > 0
    assert result.student.metrics["test_images"] == 200 and result.student.metrics["validation_images"] == 100
    assert 0.0 <= result.student.metrics["validation_accuracy"] <= 1.0 and result.student.metrics["validation_loss"] > 0
    assert set(result.timings) == {"labeling", "curation", "student"}
    record = json.loads((tmp_path / "g1" / "generation.json").read_text())
    assert record["student"]["model_uri"] == str(tmp_path / "g1" / "model")

    # every trained model carries its corruption errors and flip rates on the test split
    for m in (meta.metrics, result.student.metrics):
        assert m["robustness_images"] == 200
        assert all(0.0 <= m[f"corruption_error_{kind}"] <= 1.0 for kind in robustness.CORRUPTIONS)
        assert all(0.0 <= m[f"flip_rate_{kind}"] <= 1.0 for kind in robustness.PERTURBATIONS)
    # the student's robustness is relative to its teacher's when no baseline is named
    assert result.student.metrics["mce"] == pytest.approx(
        robustness.relative(result.student.metrics, meta.metrics)["mce"]
    )

    # the student's folder alone is enough to be the next teacher; this one is fine-tuned on labeled data last,
    # and its robustness is relative to the first teacher, as a folder with no robustness metrics (an imported
    # model): the job evaluates it on the same corrupted images
    model, next_meta = models.load(result.student.model_uri)
    assert isinstance(next_meta, ModelMeta) and not model.training
    imported = tmp_path / "imported"
    shutil.copytree(teacher.model_uri, imported)
    (imported / models.META).write_text(meta.model_copy(update={"metrics": {}}).model_dump_json())
    spec2 = spec.model_copy(
        update={
            "teacher": result.student.model_uri,
            "output": str(tmp_path / "g2"),
            "student": small(10),
            "finetune": FinetuneConfig(steps=4),
            "robustness_baseline": str(imported),
        }
    )
    result2 = pipeline.run_generation(spec2, "g2")
    assert result2.teacher_uri == result.student.model_uri
    preds = pq.read_table(result2.labeling.predictions_uri, columns=["teacher"])
    assert set(preds.column("teacher").to_pylist()) == {result.student.model_uri}
    assert result2.unfinetuned is not None and result2.unfinetuned.model_uri == str(tmp_path / "g2" / "student")
    assert result2.student.model_uri == str(tmp_path / "g2" / "model")
    tuned = models.load_meta(result2.student.model_uri)
    assert tuned.config["init_from"] == result2.unfinetuned.model_uri
    assert tuned.config["unlabeled_ratio"] == 0 and tuned.config["batch_size"] == 16 + 32
    assert tuned.config["steps"] == 4 and tuned.config["lr"] == 3e-4
    for key in ("corruption_error", "flip_rate"):  # the same model on the same test images, the same suites
        assert tuned.metrics[f"baseline_{key}"] == pytest.approx(meta.metrics[key], abs=0.03)
    assert tuned.metrics["mce"] > 0 and tuned.metrics["mfr"] >= 0  # a model that never flips has 0


def test_unknown_architecture_is_a_validation_error():
    with pytest.raises(ValueError, match="unknown architecture 'resnet_nope'"):
        small(5, architecture="resnet_nope")


def test_training_resumes_from_its_last_checkpoint(ray_cluster, data, tmp_path):
    """Re-running with the same run name and storage continues from the last checkpoint."""
    first = pipeline.train_teacher(small(10), labeled=data["labeled"], eval=data["test"], output=str(tmp_path))
    assert first.metrics["resumed_from_step"] == 0
    again = pipeline.train_teacher(small(20), labeled=data["labeled"], eval=data["test"], output=str(tmp_path))
    assert again.metrics["resumed_from_step"] == 10


def test_a_student_smaller_than_its_teacher_is_refused_unless_allowed(tmp_path):
    """A noisy student is equal to or larger than its teacher: a smaller one is a user error naming both sizes,
    unless the spec allows it."""
    teacher = ModelMeta(architecture="resnet18", input_size=32, class_names=["a", "b"], parameters=11_177_538)
    spec = GenerationSpec(
        labeled="/l", unlabeled="/u", eval="/e", output=str(tmp_path), student=small(10, architecture="test_resnet")
    )
    with pytest.raises(UserError, match=r"the student test_resnet has [\d,]+ parameters, fewer than its teacher's"):
        pipeline.check_student_size(spec, teacher)
    pipeline.check_student_size(spec.model_copy(update={"allow_smaller_student": True}), teacher)
    larger = spec.model_copy(update={"student": small(10, architecture="resnet18")})
    pipeline.check_student_size(larger, teacher)


def test_deterministic_training_gives_the_same_model_for_a_seed(ray_cluster, data, tmp_path):
    # Noise and shuffle seeded, the training streams in order: two runs of one seed, weights bit for bit.
    def weights(name: str, seed: int) -> bytes:
        config = small(12, seed=seed, deterministic=True, robustness_images=0)
        run = pipeline.train_teacher(config, labeled=data["labeled"], eval=data["test"], output=str(tmp_path / name))
        return open(os.path.join(run.model_uri, models.WEIGHTS), "rb").read()

    first = weights("a", 3)
    assert weights("b", 3) == first
    assert weights("c", 4) != first
