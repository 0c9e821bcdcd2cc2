"""A stall watchdog for Ray Data jobs: no progress for a set time fails the job with a diagnosis, never a hang.

Contract: ``watch(ds, stall_timeout_s, job="labeling")`` arms the dataset ``ds``; when its execution then makes
no progress for ``stall_timeout_s`` seconds, the execution fails with ``StallError``, raised from the call that
runs the dataset (``write_datasink``, iteration). Progress is what Ray Data itself counts: an output taken
from an operator, or a block entering or leaving an operator's queues. The error's message names what waits
on what: each operator still running with its running and pending tasks or actors and the resources one of
them needs, the resource demands that the cluster has not placed, and the cluster's resources, available of
total. Ray Data has a guard of its own (``execution_no_progress_timeout_s``), but it is off for pipelines with
an all-to-all operator and says only that nothing moved, not what is missing.

The watchdog runs inside Ray Data's scheduling loop (an ``ExecutionCallback`` on the dataset's own context):
it needs no thread, and the exception it raises ends the execution the way any failed operator does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback

from trainer import stall
from trainer.stall import StallError

log = logging.getLogger(__name__)

# DataContext key holding (stall_timeout_s, job name) for the datasets that `watch` armed.
CONFIG_KEY = "nstudent.stall_watchdog"


def watch(ds: ray.data.Dataset, stall_timeout_s: float | None, *, job: str = "job") -> ray.data.Dataset:
    """Arm ``ds`` (in place, and returned): its execution fails with StallError after ``stall_timeout_s``
    seconds without progress. ``None`` leaves it unwatched."""
    if stall_timeout_s is None:
        return ds
    ctx = ds.context
    ctx.set_config(CONFIG_KEY, (float(stall_timeout_s), job))
    # A new list: the dataset's context may share the old one with the process-wide DataContext.
    ctx.custom_execution_callback_classes = [
        *[c for c in ctx.custom_execution_callback_classes if c is not StallWatchdog],
        StallWatchdog,
    ]
    return ds


class StallWatchdog(ExecutionCallback):
    """Checks progress at each step of Ray Data's scheduling loop (a few times a second)."""

    def __init__(self) -> None:
        self.timeout_s: float | None = None
        self.job = "job"
        self.last_state: list[tuple[int, int, int]] | None = None
        self.last_progress = time.monotonic()

    def before_execution_starts(self, executor) -> None:
        setting = executor._data_context.get_config(CONFIG_KEY)
        if setting is not None:
            self.timeout_s, self.job = setting
        self.last_progress = time.monotonic()

    def on_execution_step(self, executor) -> None:
        if self.timeout_s is None:
            return
        state = _progress_state(executor)
        now = time.monotonic()
        if state != self.last_state:
            self.last_state, self.last_progress = state, now
            return
        if now - self.last_progress >= self.timeout_s:
            message = (
                f"{self.job} made no progress for {now - self.last_progress:.0f}s "
                f"(stall timeout {self.timeout_s:g}s)\n" + diagnose(executor)
            )
            log.error("%s", message)
            raise StallError(message)


def _progress_state(executor) -> list[tuple[int, int, int]]:
    return [
        (op.metrics.num_outputs_taken, state.total_enqueued_input_blocks(), state.total_enqueued_output_blocks())
        for op, state in executor._topology.items()
    ]


def _needs(op) -> dict[str, float]:
    """The resources that one task or actor of a Ray Data operator asks for."""
    args: dict[str, Any] = dict(getattr(op, "_ray_remote_args", None) or {})
    needs = {"CPU": float(args.get("num_cpus", 1) or 0), "GPU": float(args.get("num_gpus", 0) or 0)}
    needs.update({k: float(v) for k, v in (args.get("resources") or {}).items()})
    if args.get("memory"):
        needs["memory"] = float(args["memory"])
    return {k: v for k, v in needs.items() if v}


def diagnose(executor=None) -> str:
    """What the job waits on: its operators (from ``executor``, a running StreamingExecutor), the resource
    demands the cluster has not placed, and the cluster's resources. Each part that cannot be read is left
    out, so this never raises."""
    total, available, lines = stall.resources()
    if executor is not None:
        try:
            lines += _operator_lines(executor, available, total)
        except Exception as e:  # noqa: BLE001 - Ray Data internals: report, never fail the report
            lines.append(f"operators unreadable: {type(e).__name__}: {e}")
    return "\n".join(lines + stall.cluster_lines(total, available))


def _operator_lines(executor, available: dict[str, float], total: dict[str, float]) -> list[str]:
    lines = []
    for op, state in executor._topology.items():
        if op.has_completed() or not hasattr(op, "_ray_remote_args"):
            continue
        needs = _needs(op)
        pools = op.get_autoscaling_actor_pools()
        queued = state.total_enqueued_input_blocks()
        if pools:
            running = sum(p.num_running_actors() for p in pools)
            pending = sum(p.num_pending_actors() for p in pools)
            what = f"actor {op.name}: {running} running, {pending} pending"
            if pending or not running:
                what += f"; each needs {stall.fmt(needs)}, cluster has {stall.has(needs, available, total)}"
        else:
            active = op.num_active_tasks()
            what = f"tasks of {op.name}: {active} running"
            if not active:
                what += f"; each needs {stall.fmt(needs)}, cluster has {stall.has(needs, available, total)}"
        lines.append(f"{what}; {queued} input block(s) queued")
    return lines
