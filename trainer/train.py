"""The student (and generation-0 teacher) training job: a Ray Train TorchTrainer.

Each step's batch holds ``batch_size`` labeled images and ``unlabeled_ratio`` times as many pseudo-labeled
ones, all noised (RandAugment in the data tasks, dropout and stochastic depth in the model). The loss is
cross-entropy against soft targets (the teacher's top-k softmax) or smoothed hard labels. An EMA of the
weights is kept, evaluated on the held-out split and saved as the model folder, ready to be the next teacher.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, Generic, TypeVar

import pyarrow as pa
import ray
import ray.train
import torch
import torch.distributed as dist
from pydantic import BaseModel
from ray.train.torch import TorchTrainer
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from curation import imaging, storage
from curation.errors import UserError
from curation.layout import PROGRESS_SECONDS, Phase, write_progress
from trainer import data, models, noise, robustness, stall
from trainer.config import TrainConfig
from trainer.meta import ModelMeta, ModelShape
from trainer.tracking import Tracker, TrackingConfig, tracking_config

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
EVAL_BATCH_SIZE = 256
# The held-out datasets a run evaluates its model on: name -> (metric prefix, prefix of its skipped images).
# Validation is the split to choose settings on; test is only reported.
HELD_OUT = {"validation": ("validation", "validation_skipped"), "eval": ("test", "eval_skipped")}
T = TypeVar("T")
Predict = Callable[[torch.Tensor], torch.Tensor]  # uint8 NHWC pixels -> top-1 classes
# Steps left out of the steady-state throughput: the first batches wait for the data streams to fill.
STEADY_AFTER_STEPS = 5


class TrainResult(BaseModel):
    model_uri: str
    metrics: dict[str, float]
    parameters: int
    seconds: float


def _train_loop(cfg: dict[str, Any]) -> None:
    """Ray Train's loop on each worker; rank 0 also tracks the run in MLflow when the driver asked for it."""
    rank = ray.train.get_context().get_world_rank()
    tracker = Tracker(TrackingConfig.model_validate(cfg.get("tracking") or {}) if rank == 0 else TrackingConfig())
    try:
        _fit(cfg, tracker)
    except BaseException:
        tracker.fail()
        raise


def _fit(cfg: dict[str, Any], tracker: Tracker) -> None:
    """Train to ``config.steps`` from the last checkpoint (if any), evaluate the EMA model, save it (rank 0)."""
    config = TrainConfig.model_validate(cfg["config"])
    meta = ModelMeta.model_validate(cfg["meta"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)
    torch.manual_seed(config.seed + rank)
    # Every stream starts first, in threads: their tasks' processes start while the model is built.
    batches = _batches(config, cfg["has_pseudo"], device)
    held_out = {name: _Prefetched(partial(_held_out_batches, name, device)) for name in cfg["held_out"]}
    state = _State(config, meta, device)
    resumed_from = state.resume(ray.train.get_checkpoint(), device)
    model = ray.train.torch.prepare_model(state.model, move_to_device=False)
    reports = _Reports(cfg, rank, world, config.steps, resumed_from)
    skipped = torch.zeros(len(imaging.REJECT_REASONS), dtype=torch.int64)
    step, loss_sum = resumed_from, 0.0
    model.train()
    for parts in batches:
        if step >= config.steps:
            break
        pixels, target = _usable(parts, skipped)
        loss = state.step(model, models.normalize(pixels, meta), target, step + 1)
        step += 1
        loss_sum += loss
        reports.step(step, len(pixels), loss)
        if step % config.checkpoint_every == 0 or step == config.steps:
            metrics = reports.metrics(step, loss_sum / config.checkpoint_every)
            loss_sum = 0.0
            _checkpoint(state, step, metrics, rank)
            reports.checkpointed(metrics)
            if rank == 0:
                tracker.log({k: metrics[k] for k in ("loss", "images_per_second")}, step)
    if step < config.steps:
        raise RuntimeError(f"the data ran out at step {step} of {config.steps}")

    reports.phase(Phase.EVALUATING, step)
    metrics = {}
    baseline = cfg.get("robustness_baseline") or {}
    for name, batches in held_out.items():
        # The test split also runs the corruption and perturbation suites (the same seed for every model, so
        # that models evaluated on the same batches see the same corrupted images); and the baseline model's
        # when its folder has no corruption errors of its own (a model imported rather than trained here).
        suites: list[tuple[robustness.Suite, Predict]] = []
        if name == "eval" and config.robustness_images:
            cap = -(-config.robustness_images // world)
            suites.append((robustness.Suite(device, max_images=cap), models.predictor(state.ema.module, meta)))
            if baseline.get("uri"):
                base_model, base_meta = models.load(baseline["uri"])
                base_model = base_model.to(device, memory_format=torch.channels_last)
                suites.append((robustness.Suite(device, max_images=cap), models.predictor(base_model, base_meta)))
        metrics.update(
            _evaluate(state.ema.module, meta, device, world, batches, reports.beat, *HELD_OUT[name], suites=suites)
        )
        if len(suites) > 1:
            baseline["metrics"] = robustness.Suite.metrics(suites[1][0].counts)
    if baseline.get("metrics"):
        metrics.update(robustness.relative(metrics, baseline["metrics"]))
        if baseline.get("uri"):
            metrics.update({f"baseline_{k}": baseline["metrics"][k] for k in ("corruption_error", "flip_rate")})
    metrics.update(_skip_metrics(skipped, world, device, prefix="skipped"))
    metrics.update(reports.throughput())
    metrics["resumed_from_step"] = float(resumed_from)
    if rank == 0:
        models.save(state.ema.module, meta.model_copy(update={"metrics": metrics}), cfg["model_uri"])
        tracker.finish(metrics, step)
    ray.train.report({"step": step, **metrics})


class _State:
    """What a checkpoint holds: the model, its EMA, the optimizer; and the schedule that steps them."""

    def __init__(self, config: TrainConfig, meta: ModelMeta, device: torch.device) -> None:
        self.model = models.create(meta, drop_rate=config.noise.dropout, drop_path_rate=config.noise.drop_path)
        if config.init_from:  # checked by the job's driver: same architecture and classes (check_init_from)
            self.model.load_state_dict(models.load(config.init_from)[0].state_dict())
        self.model = self.model.to(device, memory_format=torch.channels_last)
        self.ema = ModelEmaV3(self.model, decay=config.ema_decay, use_warmup=True)
        self.optimizer = create_optimizer_v2(self.model, "adamw", lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = CosineLRScheduler(
            self.optimizer,
            t_initial=config.steps,
            warmup_t=config.warmup_steps,
            warmup_lr_init=config.lr / 100,
            lr_min=config.lr / 100,
            t_in_epochs=False,
        )
        self.loss_fn = SoftTargetCrossEntropy()
        self.autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def resume(self, checkpoint: ray.train.Checkpoint | None, device: torch.device) -> int:
        """Load ``checkpoint`` (when Ray Train restores one); the step it was taken at, else 0."""
        if not checkpoint:
            return 0
        with checkpoint.as_directory() as d:
            saved = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=True)
        self.model.load_state_dict(saved["model"])
        self.ema.module.load_state_dict(saved["ema"])
        self.optimizer.load_state_dict(saved["optimizer"])
        log.info("resumed at step %d", saved["step"])
        return int(saved["step"])

    def step(self, model: torch.nn.Module, pixels: torch.Tensor, target: torch.Tensor, step: int) -> float:
        """One optimizer step of ``model`` (this state's model, wrapped for data parallelism); its loss."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss_fn(model(pixels), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step_update(step)
        self.ema.update(self.model, step=step)
        return loss.item()

    def saved(self, step: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": step,
        }


def _batches(config: TrainConfig, has_pseudo: bool, device: torch.device):
    """Each step's batches: (labeled,) or (labeled, pseudo-labeled), from this worker's dataset shards."""

    def stream(name: str, batch_size: int):
        return ray.train.get_dataset_shard(name).iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=config.shuffle_buffer or None,
            device=device,
        )

    # Each stream fetches its first batch in a thread: both start at once, not the second after the first's batch.
    labeled = _Prefetched(partial(stream, "labeled", config.batch_size))
    if has_pseudo:
        return zip(labeled, _Prefetched(partial(stream, "pseudo", config.unlabeled_batch_size)))
    return ((b,) for b in labeled)


def _checkpoint(state: _State, step: int, metrics: dict[str, float], rank: int) -> None:
    """Report ``metrics`` to Ray Train with a checkpoint of the state (saved by rank 0)."""
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            torch.save(state.saved(step), os.path.join(d, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


class _Reports:
    """What a worker tells as it trains: the progress file for the control plane (rank 0: at the first step,
    at each checkpoint and every ``progress_seconds`` between), the heartbeat for the driver's stall watchdog
    (rank 0), and the throughput metrics (images per second overall and in the steady state)."""

    def __init__(self, cfg: dict[str, Any], rank: int, world: int, steps: int, resumed_from: int) -> None:
        self.cfg, self.rank, self.world, self.steps, self.resumed_from = cfg, rank, world, steps, resumed_from
        self.every = float(cfg.get("progress_seconds") or PROGRESS_SECONDS)
        self.beat = stall.Beater(cfg.get("heartbeat") if rank == 0 else None)
        self.started = self.last_step_at = time.time()
        self.seen = 0
        self.steady_from: float | None = None
        self.steady_seen = 0
        # Since the last progress write: when, images seen then, loss summed and steps since.
        self.shown_at, self.shown_seen, self.shown_loss, self.shown_steps = self.started, 0, 0.0, 0

    def step(self, step: int, images: int, loss: float) -> None:
        self.seen += images
        self.last_step_at = now = time.time()
        self.shown_loss, self.shown_steps = self.shown_loss + loss, self.shown_steps + 1
        self.beat(f"training step {step} of {self.steps}")
        if self.rank == 0 and (step == self.resumed_from + 1 or now - self.shown_at >= self.every):
            # The first step's time holds the wait for the data streams: no rate from it.
            elapsed = max(now - self.shown_at, 1e-9)
            rate = (self.seen - self.shown_seen) * self.world / elapsed if self.shown_seen else None
            self._write(Phase.TRAINING, step=step, loss=self.shown_loss / self.shown_steps, images_per_second=rate)
            self.shown_at, self.shown_seen, self.shown_loss, self.shown_steps = now, self.seen, 0.0, 0
        if step == self.resumed_from + STEADY_AFTER_STEPS:
            self.steady_from, self.steady_seen = now, self.seen

    def metrics(self, step: int, loss: float) -> dict[str, float]:
        """The metrics reported with a checkpoint."""
        return {"step": step, "loss": loss, "images_per_second": self.seen * self.world / (time.time() - self.started)}

    def checkpointed(self, metrics: dict[str, float]) -> None:
        self._write(
            Phase.TRAINING,
            step=int(metrics["step"]),
            loss=metrics["loss"],
            images_per_second=metrics["images_per_second"],
        )

    def phase(self, phase: Phase, step: int) -> None:
        self.beat(f"{phase.value} at step {step}")
        self._write(phase, step=step)

    def throughput(self) -> dict[str, float]:
        out = {
            "train_images_per_second": self.seen * self.world / max(time.time() - self.started, 1e-9),
            "train_loop_seconds": self.last_step_at - self.started,
        }
        if self.steady_from is not None and self.last_step_at > self.steady_from:
            out["train_steady_images_per_second"] = (
                (self.seen - self.steady_seen) * self.world / (self.last_step_at - self.steady_from)
            )
        return out

    def _write(self, phase: Phase, **progress: int | float | None) -> None:
        if self.rank == 0:
            _write_progress(self.cfg, phase, steps=self.steps, **progress)


def _write_progress(cfg: dict[str, Any], phase: Phase, **progress: int | float) -> None:
    """The generation's progress file, which the control plane reads to show progress (best effort: a failed
    write never stops training)."""
    if cfg.get("progress_uri"):
        try:
            write_progress(cfg["progress_uri"], phase, **progress)
        except OSError as e:
            log.warning("could not write progress: %s", e)


@torch.inference_mode()
def _evaluate(
    model: torch.nn.Module,
    meta: ModelMeta,
    device: torch.device,
    world: int,
    batches: Iterable[dict[str, torch.Tensor]],
    beat: stall.Beater,
    prefix: str,
    skipped_prefix: str,
    suites: Sequence[tuple[robustness.Suite, Predict]] = (),
) -> dict[str, float]:
    """``<prefix>_accuracy`` and ``<prefix>_images`` of ``model`` on a held-out split, with the images skipped.
    Each of ``suites`` runs on the same images with its predictor; the first one's corruption errors and flip
    rates are the model's (all of them are reduced over the workers)."""
    model.eval()
    predict = models.predictor(model, meta)

    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, total
    skipped = torch.zeros(len(imaging.REJECT_REASONS), dtype=torch.int64)
    for batch in batches:
        beat("evaluating")
        ok = _count_skips(batch[noise.SKIP], skipped)
        if not bool(ok.any()):
            continue  # no collective call in this loop: ranks may skip different batches
        pixels, labels = batch["pixels"][ok], batch["label"][ok]
        pred = predict(pixels)
        counts[0] += (pred == labels).sum()
        counts[1] += len(pred)
        for suite, suite_predict in suites:
            suite.update(suite_predict, pixels, labels)
    if world > 1:
        dist.all_reduce(counts)
    out = {
        f"{prefix}_accuracy": float(counts[0]) / max(float(counts[1]), 1.0),
        f"{prefix}_images": float(counts[1]),
        **_skip_metrics(skipped, world, device, prefix=skipped_prefix),
    }
    for suite, _ in suites:
        if world > 1:
            dist.all_reduce(suite.counts)
    if suites:
        out.update(robustness.Suite.metrics(suites[0][0].counts))
    return out


def _held_out_batches(name: str, device: torch.device) -> Iterable[dict[str, torch.Tensor]]:
    return ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=EVAL_BATCH_SIZE, device=device)


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


def _count_skips(skip: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Add a batch's skipped rows to ``counts`` by reason; the mask of its usable rows."""
    ok = skip < 0
    if not bool(ok.all()):
        counts += torch.bincount(skip[~ok].long().cpu(), minlength=len(counts))
    return ok


def _usable(parts: tuple[dict[str, torch.Tensor], ...], skipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels and targets of a step's batches (labeled, pseudo-labeled) less the rows whose image was skipped,
    counted by reason into ``skipped``. When no row is usable the step still runs (data-parallel workers
    must all take part in it) on the zero images with zero targets: a loss of 0, no change to the weights
    but the EMA's decay."""
    oks = [_count_skips(p[noise.SKIP], skipped) for p in parts]
    pixels = torch.cat([p["pixels"][ok] for p, ok in zip(parts, oks)])
    target = torch.cat([p["target"][ok] for p, ok in zip(parts, oks)])
    if len(pixels):
        return pixels, target
    return torch.cat([p["pixels"] for p in parts]), torch.zeros_like(torch.cat([p["target"] for p in parts]))


def _skip_metrics(skipped: torch.Tensor, world: int, device: torch.device, *, prefix: str) -> dict[str, float]:
    """``<prefix>_images`` (images skipped by every worker since the run last started) and
    ``<prefix>_<reason>`` for each reason with any."""
    if world > 1:
        skipped = skipped.to(device)
        dist.all_reduce(skipped)
    counts = skipped.cpu().tolist()
    out = {f"{prefix}_images": float(sum(counts))}
    out.update({f"{prefix}_{r}": float(c) for r, c in zip(imaging.REJECT_REASONS, counts) if c})
    return out


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
    _write_progress({"progress_uri": progress_uri}, Phase.TRAINING, step=0, steps=config.steps)
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
    saved = models.load_meta(model_uri)
    return TrainResult(
        model_uri=model_uri, metrics=saved.metrics, parameters=meta.parameters, seconds=time.time() - started
    )


def _baseline(uri: str | None) -> dict[str, Any] | None:
    """What the workers compare the model's robustness with: the baseline's metrics when its folder has them,
    else its URI, for the workers to evaluate it too."""
    if uri is None:
        return None
    metrics = models.load_meta(uri).metrics
    return {"metrics": metrics} if "corruption_error" in metrics else {"uri": uri}


def check_init_from(config: TrainConfig, class_names: list[str]) -> None:
    """The model folder a run starts from has the run's architecture and classes; else a UserError."""
    if not config.init_from:
        return
    try:
        start = models.load_meta(config.init_from)
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
        dataset_config=ray.train.DataConfig(datasets_to_split="all" if config.workers > 1 else []),
    )
