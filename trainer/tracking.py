"""Experiment tracking in MLflow, optional (``pip install 'nstudent[mlflow]'``): one MLflow run per training run.

Contract: ``Tracker(config)`` with a ``TrackingConfig`` whose ``uri`` is set opens an MLflow run (experiment
``experiment``, run name ``run_name``, ``tags``) and logs ``params``; ``log(metrics, step)`` logs metrics at a
step (each checkpoint); ``finish(metrics, step)`` logs the final evaluation and ends the run, ``fail()`` ends it
as failed. With no URI every call does nothing. Tracking never stops training: a missing ``mlflow`` package
or an unreachable tracking server is logged as a warning and tracking is off for the rest of the run.
``tracking_config()`` reads MLflow's own variables (``SHARED_ENV``) in the process that starts the training run;
the worker that tracks gets them from there. Credentials (``MLFLOW_TRACKING_TOKEN``, ...) are not carried:
they come from the workers' own environment.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "nstudent"
# MLflow's variables that the driver hands to the worker that tracks (none of them a secret). MLflow 3 refuses
# a file store (a local folder) unless MLFLOW_ALLOW_FILE_STORE=true.
SHARED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE")
PARAMS_PER_CALL = 100  # MLflow's limit per log_batch


class TrackingConfig(BaseModel):
    uri: str | None = Field(None, description="MLflow tracking URI; none: no tracking")
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str = "train"
    tags: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict, description="SHARED_ENV as the driver had them")


def tracking_config(run_name: str, params: dict[str, Any], tags: dict[str, str]) -> TrackingConfig:
    return TrackingConfig(
        uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
        experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT,
        run_name=run_name,
        tags=tags,
        params=params,
        env={k: os.environ[k] for k in SHARED_ENV if os.environ.get(k)},
    )


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters as ``a.b`` keys with string values (MLflow keeps params as text)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]
    return out


class Tracker:
    def __init__(self, config: TrackingConfig):
        self.client, self.run_id = None, None
        if not config.uri:
            return
        for k, v in config.env.items():
            os.environ.setdefault(k, v)
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            log.warning("MLFLOW_TRACKING_URI is set but mlflow is not installed: pip install 'nstudent[mlflow]'")
            return
        try:
            client = MlflowClient(tracking_uri=config.uri)
            experiment = client.get_experiment_by_name(config.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.experiment)
            self.run_id = client.create_run(experiment_id, run_name=config.run_name, tags=config.tags).info.run_id
            params = [Param(k, v) for k, v in sorted(flatten(config.params).items())]
            for i in range(0, len(params), PARAMS_PER_CALL):
                client.log_batch(self.run_id, params=params[i : i + PARAMS_PER_CALL])
            self.client = client
        except Exception as e:  # tracking is best effort: training goes on without it
            log.warning("MLflow tracking is off for this run: %s", e)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:
            self.client.log_batch(
                str(self.run_id), metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
            )
        except Exception as e:
            log.warning("MLflow tracking is off for this run: %s", e)
            self.client = None

    def finish(self, metrics: dict[str, float], step: int) -> None:
        self.log(metrics, step)
        self._end("FINISHED")

    def fail(self) -> None:
        self._end("FAILED")

    def _end(self, status: str) -> None:
        if self.client is None:
            return
        try:
            self.client.set_terminated(str(self.run_id), status)
        except Exception as e:
            log.warning("MLflow run not closed: %s", e)
        self.client = None
