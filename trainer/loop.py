"""The training loop on each Ray Train worker: the model, its optimizer, schedule and EMA, the steps, the
checkpoints, the evaluation on the held-out splits, and the model folder.

It imports timm (about 2 s of a CPU). ``trainer.train`` does not: its loop starts the worker's data streams first
and imports this module while their tasks start.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from curation import imaging
from curation.layout import PROGRESS_SECONDS, Phase
from trainer import models, noise, robustness, stall
from trainer.config import TrainConfig
from trainer.meta import ModelMeta
from trainer.tracking import Tracker
from trainer.train import HELD_OUT, write_run_progress

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
Predict = Callable[[torch.Tensor], torch.Tensor]  # uint8 NHWC pixels -> top-1 classes
# Steps left out of the steady-state throughput: the first batches wait for the data streams to fill.
STEADY_AFTER_STEPS = 5


def run(
    cfg: dict[str, Any],
    tracker: Tracker,
    batches: Iterable[tuple[dict[str, torch.Tensor], ...]],
    held_out_streams: Callable[[], dict[str, Iterable[dict[str, torch.Tensor]]]],
) -> None:
    """Train to ``config.steps`` from the last checkpoint (if any) on ``batches``, evaluate the EMA model on the
    streams that ``held_out_streams`` starts, save it (rank 0). The held-out streams start after the first step:
    until then their tasks would take the CPU that the first training batches wait for."""
    config = TrainConfig.model_validate(cfg["config"])
    meta = ModelMeta.model_validate(cfg["meta"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)
    torch.manual_seed(config.seed + rank)
    held_out: dict[str, Iterable[dict[str, torch.Tensor]]] | None = None
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
        if held_out is None:
            held_out = held_out_streams()
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
    for name, held in (held_out if held_out is not None else held_out_streams()).items():
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
            _evaluate(state.ema.module, meta, device, world, held, reports.beat, *HELD_OUT[name], suites=suites)
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
            write_run_progress(self.cfg, phase, steps=self.steps, **progress)


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
    """``<prefix>_accuracy``, ``<prefix>_loss`` (mean cross-entropy in nats: finer than accuracy on a small split)
    and ``<prefix>_images`` of ``model`` on a held-out split, with the images skipped.
    Each of ``suites`` runs on the same images with its predictor; the first one's corruption errors and flip
    rates are the model's (all of them are reduced over the workers)."""
    model.eval()
    score = models.scorer(model, meta)

    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct, total, summed cross-entropy
    skipped = torch.zeros(len(imaging.REJECT_REASONS), dtype=torch.int64)
    for batch in batches:
        beat("evaluating")
        ok = _count_skips(batch[noise.SKIP], skipped)
        if not bool(ok.any()):
            continue  # no collective call in this loop: ranks may skip different batches
        pixels, labels = batch["pixels"][ok], batch["label"][ok]
        logits = score(pixels)
        counts[0] += (logits.argmax(dim=1) == labels).sum()
        counts[1] += len(labels)
        counts[2] += F.cross_entropy(logits.float(), labels, reduction="sum")
        for suite, suite_predict in suites:
            suite.update(suite_predict, pixels, labels)
    if world > 1:
        dist.all_reduce(counts)
    out = {
        f"{prefix}_accuracy": float(counts[0]) / max(float(counts[1]), 1.0),
        f"{prefix}_loss": float(counts[2]) / max(float(counts[1]), 1.0),
        f"{prefix}_images": float(counts[1]),
        **_skip_metrics(skipped, world, device, prefix=skipped_prefix),
    }
    for suite, _ in suites:
        if world > 1:
            dist.all_reduce(suite.counts)
    if suites:
        out.update(robustness.Suite.metrics(suites[0][0].counts))
    return out


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
