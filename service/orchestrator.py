"""Follows every unfinished generation: submits its Ray jobs, records progress, chains iterations.

Each generation is a small state machine driven from the database; ``advance`` looks at the stored stage and
at Ray's job status and takes one step. It holds no state of its own, so a restarted control plane picks up
every unfinished generation where the database and Ray say it is (reconciliation is just the first tick).

Jobs, in order:  [teacher]  ``nstudent job teacher``  (only when no teacher is given)
                 label      ``nstudent job label``    labeling + curation (Ray Data)
                 train      ``nstudent job train``    the noisy student (Ray Train)
A job's submission id is ``<generation>-<kind>``, written to the database before it is submitted: a
restart that finds the id recorded asks Ray for it and only submits if Ray has never heard of it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from prometheus_client import Counter, Gauge

from curation import sources
from curation.stats import DatasetStats
from service import storage
from service.pipeline import progress_uri
from service.jobs import JobState, Jobs, RayUnavailable
from service.specs import GenerationSpec
from service.store import STAGES, TERMINAL, Dataset, Generation, StaleWrite, Store, utcnow
from trainer import models

log = logging.getLogger(__name__)

GENERATIONS = Gauge("nstudent_generations", "generations by stage", ["stage"])
JOBS_SUBMITTED = Counter("nstudent_jobs_submitted_total", "Ray jobs submitted", ["kind"])
TICK_ERRORS = Counter("nstudent_orchestrator_errors_total", "failed steps of the orchestrator", ["kind"])

# The job that runs during each active stage, and the phases each job reports in progress.json.
JOB_OF_STAGE = {"training_teacher": "teacher", "labeling": "label", "curating": "label",
                "training": "train", "evaluating": "train"}
PHASES = {"teacher": {"training", "evaluating"}, "label": {"labeling", "curating"},
          "train": {"training", "evaluating"}}


def spec_uri(output: str) -> str:
    return storage.join(output, "spec.json")


def dataset_id_of(generation_id: str) -> str:
    return "d-" + generation_id.removeprefix("g-")


class Orchestrator:
    def __init__(self, store: Store, jobs: Jobs, poll_seconds: float = 2.0):
        self.store, self.jobs, self.poll_seconds = store, jobs, poll_seconds
        self.ray_reachable = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # the loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="orchestrator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        """Take the next step now (after a new generation or a cancel) instead of at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def tick(self) -> None:
        for generation in self.store.unfinished():
            if self._stop.is_set():
                return
            try:
                self.advance(generation)
                self.ray_reachable = True
            except RayUnavailable as e:
                self.ray_reachable = False
                TICK_ERRORS.labels("ray").inc()
                log.warning("Ray is not reachable, retrying: %s", e)
                break
            except StaleWrite:  # another replica moved it; look again next tick
                TICK_ERRORS.labels("stale").inc()
            except Exception:
                TICK_ERRORS.labels("internal").inc()
                log.exception("could not advance generation %s", generation.id)
        counts = self.store.count_by_stage()
        for stage in STAGES:
            GENERATIONS.labels(stage).set(counts.get(stage, 0))

    # one step of one generation

    def advance(self, g: Generation) -> None:
        if g.cancel_requested:
            self._cancel(g)
        elif g.stage == "queued":
            self._begin(g)
        elif g.stage == "training_teacher":
            if self._follow(g, "teacher").status == "SUCCEEDED":
                self._submit(g, "label", "labeling")
        elif g.stage in ("labeling", "curating"):
            if self._follow(g, "label").status == "SUCCEEDED":
                g = self._record_dataset(g)
                self._submit(g, "train", "training")
        elif g.stage in ("training", "evaluating"):
            if self._follow(g, "train").status == "SUCCEEDED":
                meta = models.load_meta(storage.join(g.output, "model"))
                self._finish(g, "succeeded", model_uri=storage.join(g.output, "model"), metrics=meta.metrics)

    def _begin(self, g: Generation) -> None:
        teacher = g.spec.get("teacher")
        if g.parent_id:
            parent = self.store.get(g.parent_id)
            if parent is None or parent.stage in ("failed", "cancelled"):
                why = "was not found" if parent is None else parent.stage
                stage = "cancelled" if parent is not None and parent.stage == "cancelled" else "failed"
                self._finish(g, stage, error=f"teacher generation {g.parent_id} {why}")
                return
            if parent.stage != "succeeded":
                return
            teacher = parent.model_uri
        spec = GenerationSpec.model_validate(
            {**g.spec, "teacher": teacher, "output": g.output, "unlabeled": self._listed(g) or g.spec["unlabeled"]}
        )
        storage.write_json(spec_uri(g.output), spec.model_dump(mode="json"))
        teacher_uri = teacher or storage.join(g.output, "teacher", "model")
        if teacher is None:
            self._submit(g, "teacher", "training_teacher", teacher_uri=teacher_uri)
        else:
            self._submit(g, "label", "labeling", teacher_uri=teacher_uri)

    def _listed(self, g: Generation) -> str | None:
        """The manifest the teacher generation made of the same unlabeled folder: a folder is listed once
        per chain, not once per generation (listing a bucket of 100M objects takes hours)."""
        if not g.parent_id or sources.is_manifest(g.spec["unlabeled"]):
            return None
        parent = self.store.get(g.parent_id)
        if parent is None or parent.spec.get("unlabeled") != g.spec["unlabeled"]:
            return None
        try:
            used = storage.read_json(spec_uri(parent.output))["unlabeled"]
        except (OSError, ValueError, KeyError):
            return None
        listed = used if sources.is_manifest(used) else storage.join(parent.output, "labels", "source.parquet")
        return listed if storage.exists(listed) else None

    def _submit(self, g: Generation, kind: str, stage: str, **changes: Any) -> Generation:
        submission_id = f"{g.id}-{kind}"
        self.jobs.ping()  # while Ray is down, record nothing: the generation stays where it is
        storage.delete_file(progress_uri(g.output))  # the previous job's progress is not this one's
        g = self._move(g, stage, jobs={**g.jobs, kind: submission_id}, progress={}, **changes)
        self.jobs.submit(submission_id, self._args(g, kind))
        JOBS_SUBMITTED.labels(kind).inc()
        return g

    def _args(self, g: Generation, kind: str) -> list[str]:
        args = ["job", kind, spec_uri(g.output), "--generation-id", g.id]
        if kind == "label":
            args += ["--dataset-id", dataset_id_of(g.id)]
        return args

    def _follow(self, g: Generation, kind: str) -> JobState:
        """Check the stage's job; record progress while it runs; fail the generation if the job failed."""
        submission_id = g.jobs[kind]
        state = self.jobs.state(submission_id)
        if state.status == "MISSING":
            # Recorded but unknown to Ray: the control plane stopped before submitting, or the Ray cluster was
            # replaced. Submitting now is the first submission this cluster sees; the job resumes from the
            # outputs and checkpoints already in storage.
            log.info("%s: job %s not found on the cluster, submitting it", g.id, submission_id)
            self.jobs.submit(submission_id, self._args(g, kind))
            JOBS_SUBMITTED.labels(kind).inc()
        elif state.status in ("PENDING", "RUNNING"):
            self._record_progress(g, kind)
        elif state.status == "FAILED":
            self._finish(g, "failed", error=f"{kind} job {submission_id}: {self.jobs.failure(submission_id)}")
        elif state.status == "STOPPED":
            self._finish(g, "failed", error=f"{kind} job {submission_id} was stopped outside the service")
        return state

    def _record_progress(self, g: Generation, kind: str) -> None:
        try:
            progress = storage.read_json(progress_uri(g.output))
        except (OSError, ValueError):
            return
        progress.pop("time", None)
        phase = progress.get("phase")
        if phase not in PHASES[kind]:
            return
        stage = g.stage
        if kind != "teacher" and phase in ("curating", "evaluating"):  # the teacher's evaluation is its stage
            stage = phase
        if progress != g.progress or stage != g.stage:
            self._move(g, stage, progress=progress)

    def _record_dataset(self, g: Generation) -> Generation:
        stats = DatasetStats.model_validate(storage.read_json(storage.join(g.output, "dataset", "stats.json")))
        self.store.put_dataset(
            Dataset(
                id=stats.dataset_id,
                generation_id=g.id,
                manifest_uri=stats.manifest_uri,
                rows=stats.manifest_rows,
                checksum=stats.manifest_checksum,
                stats=stats.model_dump(mode="json"),
            )
        )
        return self.store.update(g, dataset_id=stats.dataset_id)

    def _cancel(self, g: Generation) -> None:
        kind = JOB_OF_STAGE.get(g.stage)
        if kind and kind in g.jobs:
            state = self.jobs.state(g.jobs[kind])
            if state.status in ("PENDING", "RUNNING"):
                self.jobs.stop(g.jobs[kind])
                return  # finished once Ray reports it stopped
        self._finish(g, "cancelled", error=g.error or "cancelled on request")

    # bookkeeping

    def _move(self, g: Generation, stage: str, **changes: Any) -> Generation:
        if stage != g.stage:
            now = utcnow().isoformat()
            timings = {k: dict(v) for k, v in g.timings.items()}
            if g.stage in timings:
                timings[g.stage]["finished"] = now
            if stage not in TERMINAL:
                timings[stage] = {"started": now}
            changes["timings"] = timings
            log.info("%s: %s -> %s", g.id, g.stage, stage)
        return self.store.update(g, stage=stage, **changes)

    def _finish(self, g: Generation, stage: str, **changes: Any) -> Generation:
        return self._move(g, stage, finished_at=utcnow(), **changes)


def wait_for(store: Store, generation_id: str, timeout: float, poll: float = 1.0) -> Generation:
    """Poll the store until a generation is finished (tests and scripts)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        g = store.get(generation_id)
        if g is not None and g.stage in TERMINAL:
            return g
        time.sleep(poll)
    raise TimeoutError(f"generation {generation_id} not finished after {timeout:.0f}s")
