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
import time
from typing import Any

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
from curation.layout import Phase, progress_seconds, write_progress
from trainer import data, models, noise
from trainer.config import TrainConfig
from trainer.meta import ModelMeta, ModelShape
from trainer.tracking import Tracker, TrackingConfig, tracking_config

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
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
    config = TrainConfig.model_validate(cfg["config"])
    meta = ModelMeta.model_validate(cfg["meta"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)
    torch.manual_seed(config.seed + rank)

    model = models.create(meta, drop_rate=config.noise.dropout, drop_path_rate=config.noise.drop_path)
    model = model.to(device, memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True)
    optimizer = create_optimizer_v2(model, "adamw", lr=config.lr, weight_decay=config.weight_decay)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=config.steps,
        warmup_t=config.warmup_steps,
        warmup_lr_init=config.lr / 100,
        lr_min=config.lr / 100,
        t_in_epochs=False,
    )
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        log.info("resumed at step %d", step)
    resumed_from = step
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    loss_fn = SoftTargetCrossEntropy()
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def batches(name: str, batch_size: int):
        shard = ray.train.get_dataset_shard(name)
        return shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=config.shuffle_buffer or None,
            device=device,
        )

    labeled = batches("labeled", config.batch_size)
    pseudo = batches("pseudo", config.unlabeled_batch_size) if cfg["has_pseudo"] else None
    started, seen, loss_sum = time.time(), 0, 0.0
    steady_from, steady_seen, last_step_at = None, 0, started
    # Progress for the bars: written at the first step and then every few seconds (a small file write).
    shown = {"at": started, "seen": 0, "loss": 0.0, "steps": 0}
    progress_seconds = float(cfg.get("progress_seconds") or 2.0)
    skipped = torch.zeros(len(imaging.REJECT_REASONS), dtype=torch.int64)
    model.train()
    for parts in zip(labeled, pseudo) if pseudo is not None else ((b,) for b in labeled):
        if step >= config.steps:
            break
        pixels, target = _usable(parts, skipped)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(models.normalize(pixels, meta)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        scheduler.step_update(step)
        ema.update(model, step=step)
        seen += len(pixels)
        loss_value = loss.item()
        loss_sum += loss_value
        last_step_at = time.time()
        shown["loss"], shown["steps"] = shown["loss"] + loss_value, shown["steps"] + 1
        if rank == 0 and (step == resumed_from + 1 or last_step_at - shown["at"] >= progress_seconds):
            # The first step's time holds the wait for the data streams: no rate from it.
            rate = (seen - shown["seen"]) * world / max(last_step_at - shown["at"], 1e-9) if shown["seen"] else None
            _write_progress(
                cfg,
                Phase.TRAINING,
                step=step,
                steps=config.steps,
                loss=shown["loss"] / shown["steps"],
                images_per_second=rate,
            )
            shown.update(at=last_step_at, seen=seen, loss=0.0, steps=0)
        if step == resumed_from + STEADY_AFTER_STEPS:
            steady_from, steady_seen = last_step_at, seen
        if step % config.checkpoint_every == 0 or step == config.steps:
            metrics = {
                "step": step,
                "loss": loss_sum / config.checkpoint_every,
                "images_per_second": seen * world / (time.time() - started),
            }
            loss_sum = 0.0
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save(
                        {
                            "model": _unwrap(model).state_dict(),
                            "ema": ema.module.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "step": step,
                        },
                        os.path.join(d, CHECKPOINT_FILE),
                    )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
            if rank == 0:
                _write_progress(
                    cfg,
                    Phase.TRAINING,
                    step=step,
                    steps=config.steps,
                    loss=metrics["loss"],
                    images_per_second=metrics["images_per_second"],
                )
                tracker.log({"loss": metrics["loss"], "images_per_second": metrics["images_per_second"]}, step)
    if step < config.steps:
        raise RuntimeError(f"the data ran out at step {step} of {config.steps}")

    if rank == 0:
        _write_progress(cfg, Phase.EVALUATING, step=step, steps=config.steps)
    metrics = _evaluate(ema.module, meta, device, world)
    metrics.update(_skip_metrics(skipped, world, device, prefix="skipped"))
    metrics["train_images_per_second"] = seen * world / max(time.time() - started, 1e-9)
    if steady_from is not None and last_step_at > steady_from:
        metrics["train_steady_images_per_second"] = (seen - steady_seen) * world / (last_step_at - steady_from)
    metrics["train_loop_seconds"] = last_step_at - started
    metrics["resumed_from_step"] = float(resumed_from)
    if rank == 0:
        models.save(ema.module, meta.model_copy(update={"metrics": metrics}), cfg["model_uri"])
        tracker.finish(metrics, step)
    ray.train.report({"step": step, **metrics})


def _write_progress(cfg: dict[str, Any], phase: Phase, **progress: int | float) -> None:
    """The generation's progress file, which the control plane reads to show progress (best effort: a failed
    write never stops training)."""
    if cfg.get("progress_uri"):
        try:
            write_progress(cfg["progress_uri"], phase, **progress)
        except OSError as e:
            log.warning("could not write progress: %s", e)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.inference_mode()
def _evaluate(model: torch.nn.Module, meta: ModelMeta, device: torch.device, world: int) -> dict[str, float]:
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, total
    skipped = torch.zeros(len(imaging.REJECT_REASONS), dtype=torch.int64)
    shard = ray.train.get_dataset_shard("eval")
    for batch in shard.iter_torch_batches(batch_size=256, device=device):
        ok = _count_skips(batch[noise.SKIP], skipped)
        if not bool(ok.any()):
            continue  # no collective call in this loop: ranks may skip different batches
        pred = model(models.normalize(batch["pixels"][ok], meta)).argmax(dim=1)
        counts[0] += (pred == batch["label"][ok]).sum()
        counts[1] += len(pred)
    if world > 1:
        dist.all_reduce(counts)
    return {
        "test_accuracy": float(counts[0] / max(counts[1], 1)),
        "test_images": float(counts[1]),
        **_skip_metrics(skipped, world, device, prefix="eval_skipped"),
    }


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
    model_uri: str,
    storage_path: str,
    run_name: str,
    pseudo_manifest_uri: str | None = None,
    pseudo_rows: int = 0,
    code_version: str = "",
    progress_uri: str | None = None,
) -> TrainResult:
    """Fit a model on ``labeled`` (+ the curated manifest at ``pseudo_manifest_uri`` whose rows with copies
    number ``pseudo_rows``), evaluate it on ``eval_set`` and save it to ``model_uri``.

    Re-running with the same ``storage_path`` and ``run_name`` resumes from the last checkpoint. Progress
    (phase, step of steps) is written to ``progress_uri`` as the run goes.
    """
    num_classes = len(class_names)
    meta = ModelMeta(
        **config.model_dump(include=set(ModelShape.model_fields)),
        class_names=class_names,
        config=config.model_dump(mode="json"),
        code_version=code_version,
    )
    meta.parameters = models.count_parameters(models.create(meta))
    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
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
        "eval": data.evaluation(
            ray.data.from_arrow(eval_set.select(["uri", "label"])),
            config,
            num_classes,
            by_container=data.names_members(eval_set.column("uri")),
        ),
    }
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
    # On S3, the project's filesystem: checkpoints follow its retry policy (curation.storage).
    checkpoint_path, checkpoint_fs = storage.ray_storage(storage_path)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "meta": meta.model_dump(mode="json"),
            "model_uri": model_uri,
            "has_pseudo": pseudo_manifest_uri is not None,
            "progress_uri": progress_uri,
            "progress_seconds": progress_seconds(),
            # MLflow, when MLFLOW_TRACKING_URI is set where the run starts (a job gets it from the control plane).
            "tracking": tracking_config(
                run_name,
                params={
                    **config.model_dump(mode="json"),
                    "num_classes": num_classes,
                    "labeled_images": labeled.num_rows,
                    "pseudo_rows": pseudo_rows,
                },
                tags={"model_uri": model_uri, "code_version": code_version, "checkpoints": storage_path},
            ).model_dump(),
        },
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
    )
    started = time.time()
    # The stage starts now, Ray Train's start-up included, not at its first step.
    _write_progress({"progress_uri": progress_uri}, Phase.TRAINING, step=0, steps=config.steps)
    trainer.fit()
    # The model folder is the record of what was trained: read the metrics back from it.
    saved = models.load_meta(model_uri)
    return TrainResult(
        model_uri=model_uri, metrics=saved.metrics, parameters=meta.parameters, seconds=time.time() - started
    )
