"""Stall detection for the Ray jobs: what a job waits on, and a watchdog for training runs.

Contract:
- ``cluster_lines()`` says what the cluster cannot give: the resource demands it has not placed (tasks,
  actors, placement groups, as the autoscaler sees them), the actors not started, and the cluster's resources,
  available of total. Each part that cannot be read is left out, so it never raises.
- ``TrainingWatchdog(timeout_s).run(trainer.fit)`` runs a Ray Train fit in a thread of the driver and watches
  it. Rank 0 of the run beats (``Beater(watchdog.handle)``, passed in the loop's config) as it trains and
  evaluates; when no beat comes for ``timeout_s`` seconds (Ray Train's start-up and restarts included),
  ``run`` raises ``StallError`` naming the last step seen and what the cluster cannot give. A worker group
  that the cluster cannot place, for example, waits for ever in Ray Train. The stalled run is the job's: it
  ends when the job's driver exits on the error (Ray Train's own abort waits on the very thing that stalls).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import ray

log = logging.getLogger(__name__)

# Cluster resources left out of a diagnosis: one per node, or bookkeeping.
_HIDDEN_RESOURCES = ("node:", "memory", "object_store_memory", "accelerator_type:", "bundle_group")
# Seconds between two beats of a training loop (each is one small actor call).
BEAT_SECONDS = 1.0
T = TypeVar("T")


class StallError(RuntimeError):
    """A job made no progress for its stall timeout; the message says what waits on what."""


def fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def has(needs: dict[str, float], available: dict[str, float], total: dict[str, float]) -> str:
    return (
        "{" + ", ".join(f"{k}: {available.get(k, 0):g} available of {total.get(k, 0):g}" for k in sorted(needs)) + "}"
    )


def resources() -> tuple[dict[str, float], dict[str, float], list[str]]:
    """The cluster's (total, available) resources, and a line saying why when they cannot be read."""
    try:
        return ray.cluster_resources(), ray.available_resources(), []
    except Exception as e:  # noqa: BLE001 - a diagnosis must not fail on its way out
        return {}, {}, [f"cluster resources unreadable: {type(e).__name__}: {e}"]


def cluster_lines(total: dict[str, float], available: dict[str, float]) -> list[str]:
    """The unplaced resource demands, the actors not started, and the cluster's resources."""
    lines = _demand_lines() + _pending_actor_lines()
    shown = {k: v for k, v in total.items() if not k.startswith(_HIDDEN_RESOURCES)}
    lines.append(
        "cluster: "
        + (has(shown, available, total) if shown else "no resources")
        + f", {len(_alive_nodes())} node(s) alive"
    )
    return lines


def _demand_lines() -> list[str]:
    """Resource requests of tasks, actors and placement groups that the cluster has not placed (the
    autoscaler's view, read from the GCS: no dashboard needed)."""
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        summary = status.resource_demands
        demands = [
            ("tasks/actors", r.bundle, r.count) for d in summary.ray_task_actor_demand for r in d.bundles_by_count
        ]
        # Ray Train reserves its workers' resources as a placement group: a group pending is a worker group
        # waiting for room.
        demands += [
            ("placement group", r.bundle, r.count) for d in summary.placement_group_demand for r in d.bundles_by_count
        ]
    except Exception as e:  # noqa: BLE001 - optional detail
        return [f"pending resource demands unreadable: {type(e).__name__}"]
    return [f"waiting for resources ({kind}): {fmt(bundle)} x {count}" for kind, bundle, count in demands]


def _pending_actor_lines() -> list[str]:
    try:
        from ray._private.state import state

        actors = state.actor_table(None).values()
    except Exception:  # noqa: BLE001 - optional detail
        return []
    waiting = sorted(
        f"{a.get('ActorClassName', '?')} ({a['State'].lower()})"
        for a in actors
        if a.get("State") in ("PENDING_CREATION", "DEPENDENCIES_UNREADY", "RESTARTING")
    )
    return [f"actors not started: {', '.join(waiting)}"] if waiting else []


def _alive_nodes() -> list[dict]:
    try:
        return [n for n in ray.nodes() if n.get("Alive")]
    except Exception:  # noqa: BLE001 - optional detail
        return []


class Heartbeat:
    """The last progress a training run reported (an actor of the driver's)."""

    def __init__(self) -> None:
        self.beats, self.last = 0, "no step yet"

    def beat(self, what: str) -> None:
        self.beats, self.last = self.beats + 1, what

    def read(self) -> tuple[int, str]:
        return self.beats, self.last


class Beater:
    """Rank 0's side: ``beat(what)`` tells the driver the run moves, at most once per ``BEAT_SECONDS``."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.at = handle, 0.0

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        if self.handle is not None and now - self.at >= BEAT_SECONDS:
            self.handle.beat.remote(what)
            self.at = now


class TrainingWatchdog:
    """Fails a training run that makes no progress for ``timeout_s`` seconds (``None``: never)."""

    def __init__(self, timeout_s: float | None, workers: int, needs: dict[str, float], job: str = "training") -> None:
        """``workers`` and ``needs`` (resources of each) describe the worker group, for the diagnosis."""
        self.timeout_s, self.job, self.workers, self.needs = timeout_s, job, workers, needs
        # An actor with no CPU: it is placed even on a full cluster.
        self.handle: Any = ray.remote(num_cpus=0)(Heartbeat).remote() if timeout_s is not None else None

    def run(self, fit: Callable[[], T]) -> T:
        """``fit()`` (Ray Train's, which blocks), watched from this thread; StallError when it stalls."""
        if self.timeout_s is None:
            return fit()
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = fit()
            except BaseException as e:  # noqa: BLE001 - handed to the watching thread, which raises it
                outcome["error"] = e

        thread = threading.Thread(target=target, name="training-fit", daemon=True)
        thread.start()
        try:
            self._watch(thread, self.timeout_s)
        finally:
            ray.kill(self.handle)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _watch(self, thread: threading.Thread, timeout_s: float) -> None:
        last, since, seen = None, time.monotonic(), "no step yet"
        while True:
            thread.join(min(1.0, timeout_s / 4))
            if not thread.is_alive():
                return
            try:
                beats, what = ray.get(self.handle.read.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - an unreadable heartbeat is no progress
                beats, what = last, seen
            if beats != last:
                last, since, seen = beats, time.monotonic(), what
                continue
            waited = time.monotonic() - since
            if waited >= timeout_s:
                total, available, lines = resources()
                message = "\n".join(
                    [
                        f"{self.job} made no progress for {waited:.0f}s (stall timeout {timeout_s:g}s); "
                        f"last seen: {seen}",
                        *lines,
                        f"worker group: {self.workers} worker(s), each needs {fmt(self.needs)}, "
                        f"cluster has {has(self.needs, available, total)}",
                        *cluster_lines(total, available),
                    ]
                )
                log.error("%s", message)
                # The run is left to Ray: it is the job's, and ends with the job's driver.
                raise StallError(message)
