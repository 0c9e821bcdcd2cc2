"""Experiment tracking (the nstudent[mlflow] extra) against a local MLflow file store: a real training run under
Ray Train logs its parameters, its metrics at each checkpoint and its final evaluation."""

import pytest

from service import digits, pipeline
from trainer import models
from trainer.config import TrainConfig
from trainer.tracking import Tracker, TrackingConfig

mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'nstudent[mlflow]'")


def file_store(tmp_path, monkeypatch) -> str:
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store without it
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "digits")
    return uri


@pytest.mark.slow
def test_a_training_run_logs_params_checkpoint_metrics_and_its_evaluation(ray_cluster, tmp_path, monkeypatch):
    uri = file_store(tmp_path, monkeypatch)
    data = digits.write(str(tmp_path / "digits"), labeled_per_class=5, test_per_class=5, validation_per_class=0)
    config = TrainConfig(
        architecture="test_resnet",
        input_size=32,
        mean=(0.13,) * 3,
        std=(0.31,) * 3,
        steps=10,
        batch_size=16,
        warmup_steps=2,
        checkpoint_every=5,
        unlabeled_ratio=0,
    )
    result = pipeline.train_teacher(config, labeled=data["labeled"], eval=data["test"], output=str(tmp_path / "g0"))

    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("digits")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "teacher"
    assert run.data.tags["model_uri"] == result.model_uri
    params = run.data.params
    assert params["architecture"] == "test_resnet" and params["steps"] == "10"
    assert params["noise.dropout"] == str(config.noise.dropout) and params["labeled_images"] == "50"
    # One loss and throughput point per checkpoint, at its step.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5, 10]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "images_per_second")] == [5, 10]
    # The final evaluation is the one the model folder records.
    saved = models.load_meta(result.model_uri).metrics
    assert run.data.metrics["test_accuracy"] == pytest.approx(saved["test_accuracy"]) and saved["test_images"] == 50


def test_without_a_uri_or_with_a_broken_store_training_is_untouched(tmp_path):
    quiet = Tracker(TrackingConfig())
    quiet.log({"loss": 1.0}, 1)
    quiet.finish({"test_accuracy": 0.5}, 1)
    assert quiet.client is None
    # A store that cannot be written (a file where its folder should be): a warning, no exception.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    broken = Tracker(TrackingConfig(uri=(blocker / "mlruns").as_uri(), env={"MLFLOW_ALLOW_FILE_STORE": "true"}))
    broken.log({"loss": 1.0}, 1)
    broken.fail()
    assert broken.client is None
