"""The student (and generation-0 teacher) training job: a Ray Train TorchTrainer.

Each step's batch holds ``batch_size`` labeled images and ``unlabeled_ratio`` times as many pseudo-labeled
ones, all noised (RandAugment in the data tasks, dropout and stochastic depth in the model). The loss is
cross-entropy against soft targets (the teacher's top-k softmax) or smoothed hard labels. An EMA of the
weights is kept, evaluated on the held-out split and saved as the model folder, ready to be the next teacher.

This module is the job's driver and the start of each worker's loop; the loop itself is ``trainer.loop``. Neither
this module nor what it imports imports timm: a worker starts its data streams before it imports the model's
libraries.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, Generic, TypeVar

import pyarrow as pa
import ray
import ray.train
import torch
from pydantic import BaseModel
from ray.train.torch import TorchTrainer

from curation import storage
from curation.errors import UserError
from curation.layout import PROGRESS_SECONDS, Phase, write_progress
from trainer import data, stall
from trainer.config import TrainConfig
from trainer.meta import ModelMeta, ModelShape, load_meta
from trainer.tracking import Tracker, TrackingConfig, tracking_config

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 256
# The held-out datasets a run evaluates its model on: name -> (metric prefix, prefix of its skipped images).
# Validation is the split to choose settings on; test is only reported.
HELD_OUT = {"validation": ("validation", "validation_skipped"), "eval": ("test", "eval_skipped")}
T = TypeVar("T")


class TrainResult(BaseModel):
    model_uri: str
    metrics: dict[str, float]
    parameters: int
    seconds: float


def _train_loop(cfg: dict[str, Any]) -> None:
    """Ray Train's loop on each worker; rank 0 also tracks the run in MLflow when the driver asked for it.

    The training streams start first, each fetching its first batch in a thread; then the worker imports the
    loop (timm) and builds the model while their tasks' processes start."""
    config = TrainConfig.model_validate(cfg["config"])
    device = ray.train.torch.get_device()
    batches = _batches(config, cfg["has_pseudo"], device)
    from trainer import loop  # timm: after the streams have started

    rank = ray.train.get_context().get_world_rank()
    tracker = Tracker(TrackingConfig.model_validate(cfg.get("tracking") or {}) if rank == 0 else TrackingConfig())
    try:
        loop.run(cfg, tracker, batches, partial(_held_out_streams, cfg["held_out"], device))
    except BaseException:
        tracker.fail()
        raise


def _batches(config: TrainConfig, has_pseudo: bool, device: torch.device):
    """Each step's batches: (labeled,) or (labeled, pseudo-labeled), from this worker's dataset shards."""

    def stream(name: str, batch_size: int):
        return ray.train.get_dataset_shard(name).iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=config.shuffle_buffer or None,
            local_shuffle_seed=config.seed + ray.train.get_context().get_world_rank()
            if config.shuffle_buffer
            else None,
            device=device,
        )

    # Each stream fetches its first batch in a thread: both start at once, not the second after the first's batch.
    labeled = _Prefetched(partial(stream, "labeled", config.batch_size))
    if has_pseudo:
        return zip(labeled, _Prefetched(partial(stream, "pseudo", config.unlabeled_batch_size)))
    return ((b,) for b in labeled)


def write_run_progress(cfg: dict[str, Any], phase: Phase, **progress: int | float) -> None:
    """The generation's progress file, which the control plane reads to show progress (best effort: a failed
    write never stops training)."""
    if cfg.get("progress_uri"):
        try:
            write_progress(cfg["progress_uri"], phase, **progress)
        except OSError as e:
            log.warning("could not write progress: %s", e)


def _held_out_streams(names: list[str], device: torch.device) -> dict[str, Iterable[dict[str, torch.Tensor]]]:
    """The held-out splits' batches, each stream fetching its first batch in a thread from now."""

    def stream(name: str) -> Iterable[dict[str, torch.Tensor]]:
        return ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=EVAL_BATCH_SIZE, device=device)

    return {name: _Prefetched(partial(stream, name)) for name in names}


class _Prefetched(Generic[T]):
    """The batches of ``make()``, whose first one is fetched by a thread from the start: the start of its stream
    (Ray Data's executor, its tasks' processes: seconds on a small node) overlaps the work before it. One batch is
    held at most."""

    def __init__(self, make: Callable[[], Iterable[T]]) -> None:
        self.make = make
        self.first: dict[str, Any] = {}
        self.rest: Iterator[T] = iter(())
        self.thread = threading.Thread(target=self._fetch, name="prefetch", daemon=True)
        self.thread.start()

    def _fetch(self) -> None:
        try:
            self.rest = iter(self.make())
            self.first["batch"] = next(self.rest)
        except StopIteration:
            pass
        except BaseException as e:  # noqa: BLE001 - raised where the batches are consumed
            self.first["error"] = e

    def __iter__(self) -> Iterator[T]:
        self.thread.join()
        if "error" in self.first:
            raise self.first["error"]
        if "batch" in self.first:
            yield self.first.pop("batch")
            yield from self.rest


def train(
    config: TrainConfig,
    *,
    labeled: pa.Table,
    class_names: list[str],
    eval_set: pa.Table,
    validation_set: pa.Table | None = None,
    model_uri: str,
    storage_path: str,
    run_name: str,
    pseudo_manifest_uri: str | None = None,
    pseudo_rows: int = 0,
    code_version: str = "",
    progress_uri: str | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
    robustness_baseline: str | None = None,
) -> TrainResult:
    """Fit a model on ``labeled`` (+ the curated manifest at ``pseudo_manifest_uri`` whose rows with copies
    number ``pseudo_rows``), evaluate it on ``eval_set`` and save it to ``model_uri``.

    Re-running with the same ``storage_path`` and ``run_name`` resumes from the last checkpoint. Progress
    (phase, step of steps) is written to ``progress_uri`` every ``progress_seconds`` as the run goes. A run that
    makes no progress for ``config.stall_timeout_s`` fails with ``stall.StallError``. The model's mCE and mFR
    are relative to the model folder ``robustness_baseline``, when given: to the corruption errors and flip rates
    in its metrics, or, where it has none, to its own evaluation on the same corrupted images.
    """
    meta = ModelMeta(
        **config.model_dump(include=set(ModelShape.model_fields)),
        class_names=class_names,
        config=config.model_dump(mode="json"),
        code_version=code_version,
    )
    from trainer import models  # timm, which the workers import only once their streams have started

    meta.parameters = models.count_parameters(models.create(meta))
    check_init_from(config, class_names)
    datasets = _datasets(
        config,
        labeled,
        {"eval": eval_set, "validation": validation_set},
        len(class_names),
        pseudo_manifest_uri,
        pseudo_rows,
    )
    started = time.time()
    # The stage starts now, Ray Train's start-up included, not at its first step.
    write_run_progress({"progress_uri": progress_uri}, Phase.TRAINING, step=0, steps=config.steps)
    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    per_worker = {"GPU": 1.0} if use_gpu else {"CPU": config.cpus_per_worker}
    watchdog = stall.TrainingWatchdog(config.stall_timeout_s, config.workers, per_worker)
    loop_config = {
        "config": config.model_dump(mode="json"),
        "meta": meta.model_dump(mode="json"),
        "model_uri": model_uri,
        "has_pseudo": pseudo_manifest_uri is not None,
        "held_out": [name for name in HELD_OUT if name in datasets],
        "progress_uri": progress_uri,
        "progress_seconds": progress_seconds,
        "heartbeat": watchdog.handle,
        "robustness_baseline": _baseline(robustness_baseline),
        # MLflow, when MLFLOW_TRACKING_URI is set where the run starts (a job gets it from the control plane).
        "tracking": tracking_config(
            run_name,
            params={
                **config.model_dump(mode="json"),
                "num_classes": len(class_names),
                "labeled_images": labeled.num_rows,
                "pseudo_rows": pseudo_rows,
            },
            tags={"model_uri": model_uri, "code_version": code_version, "checkpoints": storage_path},
        ).model_dump(),
    }
    # Ray Train's controller polls its workers every 2 s unless told otherwise, and a run waits for a poll at its
    # start and at its end: polled every half second, a run ends 3 s sooner. The controller reads this from the
    # driver's environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    watchdog.run(_trainer(config, use_gpu, loop_config, datasets, storage_path, run_name).fit)
    # The model folder is the record of what was trained: read the metrics back from it.
    saved = load_meta(model_uri)
    return TrainResult(
        model_uri=model_uri, metrics=saved.metrics, parameters=meta.parameters, seconds=time.time() - started
    )


def _baseline(uri: str | None) -> dict[str, Any] | None:
    """What the workers compare the model's robustness with: the baseline's metrics when its folder has them,
    else its URI, for the workers to evaluate it too."""
    if uri is None:
        return None
    metrics = load_meta(uri).metrics
    return {"metrics": metrics} if "corruption_error" in metrics else {"uri": uri}


def check_init_from(config: TrainConfig, class_names: list[str]) -> None:
    """The model folder a run starts from has the run's architecture and classes; else a UserError."""
    if not config.init_from:
        return
    try:
        start = load_meta(config.init_from)
    except (OSError, ValueError) as e:
        raise UserError(f"init_from {config.init_from}: not a model folder ({e})") from None
    if (start.architecture, start.class_names) != (config.architecture, class_names):
        raise UserError(
            f"init_from {config.init_from} is a {start.architecture} of {start.num_classes} classes; the run "
            f"trains a {config.architecture} of {len(class_names)} classes {class_names[:5]}..."
        )


def _datasets(
    config: TrainConfig,
    labeled: pa.Table,
    held_out: dict[str, pa.Table | None],
    num_classes: int,
    pseudo_manifest_uri: str | None,
    pseudo_rows: int,
) -> dict[str, ray.data.Dataset]:
    """The run's streams: labeled and pseudo-labeled rows for exactly ``config.steps`` steps, and the held-out
    sets given (test, validation)."""
    per_step = config.steps * config.workers
    datasets = {
        "labeled": data.stream(
            ray.data.from_arrow(labeled.select(["uri", "label"])),
            labeled.num_rows,
            per_step * config.batch_size,
            config,
            num_classes,
            seed=config.seed,
            by_container=data.names_members(labeled.column("uri")),
        ),
    }
    for name, table in held_out.items():
        if table is not None:
            datasets[name] = data.evaluation(
                ray.data.from_arrow(table.select(["uri", "label"])),
                config,
                num_classes,
                by_container=data.names_members(table.column("uri")),
            )
    if pseudo_manifest_uri is not None:
        manifest = data.read_manifest(pseudo_manifest_uri, ["uri", "label", "topk_classes", "topk_probs", "copies"])
        datasets["pseudo"] = data.stream(
            manifest,
            pseudo_rows,
            per_step * config.unlabeled_batch_size,
            config,
            num_classes,
            seed=config.seed + 1,
            by_container=data.manifest_names_members(pseudo_manifest_uri),
        )
    return datasets


def _trainer(
    config: TrainConfig,
    use_gpu: bool,
    loop_config: dict[str, Any],
    datasets: dict[str, ray.data.Dataset],
    storage_path: str,
    run_name: str,
) -> TorchTrainer:
    # On S3, the project's filesystem: checkpoints follow its retry policy (curation.storage).
    checkpoint_path, checkpoint_fs = storage.ray_storage(storage_path)
    return TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers,
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": config.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=checkpoint_path,
            storage_filesystem=checkpoint_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # A lost node or a killed worker restarts the worker group, which goes on from the last checkpoint.
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        ),
        datasets=datasets,
        # One worker: each stream runs in the worker's own process. Split between workers, every stream would
        # start a split coordinator first (an actor: a new process, seconds of a small node's CPU each).
        dataset_config=ray.train.DataConfig(
            datasets_to_split="all" if config.workers > 1 else [], execution_options=_execution_options(config)
        ),
    )


def _execution_options(config: TrainConfig) -> dict[str, Any] | None:
    """With ``config.deterministic``, the training streams keep their order (Ray Train's defaults otherwise)."""
    if not config.deterministic:
        return None
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return {"labeled": options, "pseudo": options}
