"""Follows every unfinished generation: admits it, submits its Ray jobs, retries them, records progress.

Each generation is a small state machine (``service.states``) driven from the database; ``advance`` looks at
the stored stage and at Ray's status of the running job's latest attempt, and takes one step. It holds no
state of its own, so a restarted control plane picks up every unfinished generation where the database and
Ray say it is (reconciliation is just the first tick).

Jobs, in order:  [teacher]  ``nstudent job teacher``  (only when no teacher is given)
                 label      ``nstudent job label``    labeling + curation (Ray Data)
                 train      ``nstudent job train``    the noisy student (Ray Train)

Attempts. A job's n-th attempt has the submission id ``<generation>-<kind>-<n>``, written to the database
before it is submitted; a restart that finds it recorded asks Ray for it and submits it only if Ray has never
heard of it. An attempt that fails for an infrastructure reason (the job's ``error.json`` says ``infra``, or
there is none: a killed job, a lost node, a restarted head) is followed by another, after a backoff, up to
``job_attempts``; every attempt resumes from what is in storage. A user error fails the generation at once.

Admission. At most ``max_running_jobs`` generations have a job on the cluster; the others wait as ``queued``,
oldest first. A generation keeps its slot from its first job to its last, so a chain never waits on itself.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any

from prometheus_client import Counter, Gauge

from curation import sources, storage
from curation.layout import ErrorKind, JobError, Layout, read_progress
from curation.stats import DatasetStats
from service.failures import LOG_LINE, one_line
from service.jobs import Jobs, RayUnavailable
from service.specs import GenerationConfig, GenerationSpec
from service.states import (
    FIRST_STAGE,
    JOB_OF_STAGE,
    STAGE_OF_PHASE,
    Attempt,
    JobKind,
    JobStatus,
    Stage,
    check_transition,
)
from service.store import DatabaseUnavailable, Dataset, Generation, StaleWrite, Store, utcnow
from trainer.meta import load_meta

log = logging.getLogger(__name__)

GENERATIONS = Gauge("nstudent_generations", "generations by stage", ["stage"])
JOBS_SUBMITTED = Counter("nstudent_jobs_submitted_total", "Ray job attempts submitted", ["kind"])
JOB_FAILURES = Counter("nstudent_job_failures_total", "failed Ray job attempts", ["kind", "cause"])
TICK_ERRORS = Counter("nstudent_orchestrator_errors_total", "failed steps of the orchestrator", ["kind"])

# The longest wait between two attempts of a job, however many came before.
MAX_BACKOFF_SECONDS = 600.0


def dataset_id_of(generation_id: str) -> str:
    return "d-" + generation_id.removeprefix("g-")


class Orchestrator:
    def __init__(
        self,
        store: Store,
        jobs: Jobs,
        *,
        poll_seconds: float = 2.0,
        max_running_jobs: int = 4,
        job_attempts: int = 3,
        retry_backoff_seconds: float = 30.0,
    ):
        self.store, self.jobs, self.poll_seconds = store, jobs, poll_seconds
        self.max_running_jobs, self.job_attempts = max_running_jobs, job_attempts
        self.retry_backoff_seconds = retry_backoff_seconds
        self.ray_reachable = False
        self._free_slots = 0
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
        """Take the next step now (after a new generation, a cancel or a retry) instead of at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        # Nothing stops the loop but ``stop``: a database that is down (restarting, failing over) leaves every
        # generation where it is, and the next tick after it is back carries on from there.
        while not self._stop.is_set():
            try:
                self.tick()
            except DatabaseUnavailable as e:
                TICK_ERRORS.labels("database").inc()
                log.warning("the database is not reachable, retrying: %s", one_line(e, LOG_LINE))
            except Exception:
                TICK_ERRORS.labels("internal").inc()
                log.exception("the orchestrator's step failed, retrying")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def tick(self) -> None:
        generations = list(self.store.unfinished())
        self._free_slots = self.max_running_jobs - sum(g.state.running for g in generations)
        for generation in generations:
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
            except DatabaseUnavailable:  # for every generation alike: the loop waits for the next poll
                raise
            except OSError as e:  # the store (spec, error.json, stats) still failing after its client's retries
                TICK_ERRORS.labels("storage").inc()
                log.warning(
                    "could not advance generation %s, the store failed: %s", generation.id, one_line(e, LOG_LINE)
                )
            except Exception:
                TICK_ERRORS.labels("internal").inc()
                log.exception("could not advance generation %s", generation.id)
        counts = self.store.count_by_stage()
        for stage in Stage:
            GENERATIONS.labels(stage.value).set(counts.get(stage.value, 0))

    # one step of one generation

    def advance(self, g: Generation) -> None:
        if g.cancel_requested:
            self._cancel(g)
            return
        if g.state == Stage.QUEUED:
            self._begin(g)
            return
        kind = JOB_OF_STAGE[g.state]
        if self._follow(g, kind) != JobStatus.SUCCEEDED:
            return
        g = self.store.get(g.id) or g
        if kind == JobKind.TEACHER:
            self._submit(g, JobKind.LABEL)
        elif kind == JobKind.LABEL:
            g = self._record_dataset(g)
            self._submit(g, JobKind.TRAIN)
        else:
            model = Layout(g.output).model
            self._finish(g, Stage.SUCCEEDED, model_uri=model, metrics=load_meta(model).metrics)

    def _begin(self, g: Generation) -> None:
        """Admit a queued generation and submit its first job not yet done (all of them unless retried)."""
        config = GenerationConfig.model_validate(g.spec)
        teacher = config.teacher
        if g.parent_id:
            parent = self.store.get(g.parent_id)
            if parent is None or parent.state in (Stage.FAILED, Stage.CANCELLED):
                why = "was not found" if parent is None else parent.stage
                stage = Stage.CANCELLED if parent is not None and parent.state == Stage.CANCELLED else Stage.FAILED
                self._finish(g, stage, error=f"teacher generation {g.parent_id} {why}")
                return
            if parent.state != Stage.SUCCEEDED:
                return
            teacher = parent.model_uri
        if self._free_slots <= 0:
            return  # waits as queued for a running generation to finish
        self._free_slots -= 1
        layout = Layout(g.output)
        listed = self._listed(g)
        unlabeled = {"unlabeled": listed, "unlabeled_format": "manifest"} if listed else {}
        spec = GenerationSpec.model_validate(
            {
                **g.spec,
                "teacher": teacher,
                "output": g.output,
                "robustness_baseline": config.robustness_baseline or self._first_teacher(g, teacher),
                **unlabeled,
            }
        )
        storage.write_json(layout.spec, spec.model_dump(mode="json"))
        order = [JobKind.LABEL, JobKind.TRAIN] if teacher else [JobKind.TEACHER, JobKind.LABEL, JobKind.TRAIN]
        done = {kind for kind in order if (a := g.attempts_of(kind)) and a[-1].status == JobStatus.SUCCEEDED}
        kind = next(kind for kind in order if kind not in done)  # a generation with every job done succeeded
        g = self.store.update(g, teacher_uri=teacher or layout.teacher_model)
        if kind == JobKind.TRAIN and g.dataset_id is None:
            g = self._record_dataset(g)
        self._submit(g, kind)

    def _first_teacher(self, g: Generation, teacher: str | None) -> str:
        """The chain's first teacher, the default baseline of its students' robustness (mCE, mFR)."""
        first = self.store.get(g.chain_id) if g.chain_index else None
        if first is not None and first.teacher_uri:
            return first.teacher_uri
        return teacher or Layout(g.output).teacher_model

    def _listed(self, g: Generation) -> str | None:
        """The manifest the teacher generation made of the same unlabeled folder: a folder is listed once
        per chain, not once per generation (listing a bucket of 100M objects takes hours)."""
        if not g.parent_id or sources.is_manifest(g.spec["unlabeled"]):
            return None
        parent = self.store.get(g.parent_id)
        if parent is None or parent.spec.get("unlabeled") != g.spec["unlabeled"]:
            return None
        parent_layout = Layout(parent.output)
        try:
            used = storage.read_json(parent_layout.spec)["unlabeled"]
        except (OSError, ValueError, KeyError):
            return None
        listed = used if sources.is_manifest(used) else parent_layout.source_manifest
        return listed if storage.exists(listed) else None

    # attempts

    def _submit(self, g: Generation, kind: JobKind) -> Generation:
        """Record the job's next attempt, then submit it, then record that Ray has it."""
        self.jobs.ping()  # while Ray is down, record nothing: the generation stays where it is
        attempts = g.attempts_of(kind)
        attempt = Attempt(
            id=f"{g.id}-{kind}-{len(attempts) + 1}", n=len(attempts) + 1, round=g.retries, created_at=utcnow()
        )
        storage.delete_file(Layout(g.output).progress)  # the previous job's progress is not this one's
        stage = FIRST_STAGE[kind]
        g = self._move(g, stage, jobs=g.with_attempts(kind, [*attempts, attempt]), progress={}, attempts=g.attempts + 1)
        return self._send(g, kind, attempt)

    def _send(self, g: Generation, kind: JobKind, attempt: Attempt) -> Generation:
        self.jobs.submit(attempt.id, self._args(g, kind, attempt.id))
        JOBS_SUBMITTED.labels(kind.value).inc()
        return self._update_attempt(g, kind, submitted=True)

    def _args(self, g: Generation, kind: JobKind, submission_id: str) -> list[str]:
        args = ["job", kind.value, Layout(g.output).spec, "--generation-id", g.id, "--attempt-id", submission_id]
        if kind == JobKind.LABEL:
            args += ["--dataset-id", dataset_id_of(g.id)]
        return args

    def _update_attempt(self, g: Generation, kind: JobKind, **changes: Any) -> Generation:
        attempts = g.attempts_of(kind)
        attempts[-1] = attempts[-1].model_copy(update=changes)
        return self.store.update(g, jobs=g.with_attempts(kind, attempts))

    def _follow(self, g: Generation, kind: JobKind) -> JobStatus:
        """The latest attempt's status; records progress while it runs, and what happened when it ended."""
        attempts = g.attempts_of(kind)
        if not attempts:  # recorded by a version without attempts; never expected
            self._submit(g, kind)
            return JobStatus.PENDING
        attempt = attempts[-1]
        if attempt.status == JobStatus.FAILED:  # waiting for its next attempt
            if attempt.retry_after is None or utcnow() >= attempt.retry_after:
                self._submit(g, kind)
            return JobStatus.FAILED
        state = self.jobs.state(attempt.id)
        if state.status == JobStatus.MISSING:
            if not attempt.submitted:
                # Recorded but never submitted: the control plane stopped in between. This is its first
                # submission; the job resumes from the outputs and checkpoints already in storage.
                log.info("%s: submitting %s, recorded before a restart", g.id, attempt.id)
                self._send(g, kind, attempt)
                return JobStatus.PENDING
            self._failed(
                g,
                kind,
                attempt,
                ErrorKind.INFRA,
                "the Ray cluster has no record of the job: its head was restarted or replaced",
            )
        elif state.status.active:
            if not attempt.submitted:
                g = self._update_attempt(g, kind, submitted=True)
            if state.status == JobStatus.RUNNING and attempt.status != JobStatus.RUNNING:
                g = self._update_attempt(g, kind, status=JobStatus.RUNNING)
            self._record_progress(g, kind)
        elif state.status == JobStatus.SUCCEEDED:
            self._update_attempt(g, kind, status=JobStatus.SUCCEEDED, finished_at=utcnow())
        elif state.status == JobStatus.FAILED:
            cause, message = self._cause(g, attempt)
            self._failed(g, kind, attempt, cause, message)
        elif state.status == JobStatus.STOPPED:
            self._failed(g, kind, attempt, ErrorKind.INFRA, "the job was stopped outside the service")
        return state.status

    def _cause(self, g: Generation, attempt: Attempt) -> tuple[ErrorKind, str]:
        """What the job said of its failure in ``error.json``; without one (killed, lost with its node) it is
        the cluster's fault, told by the last exception line of its log."""
        try:
            error = JobError.model_validate(storage.read_json(Layout(g.output).error(attempt.id)))
            return error.kind, error.message
        except (OSError, ValueError):
            return ErrorKind.INFRA, self.jobs.failure(attempt.id)

    def _failed(self, g: Generation, kind: JobKind, attempt: Attempt, cause: ErrorKind, message: str) -> None:
        JOB_FAILURES.labels(kind.value, cause.value).inc()
        this_round = sum(a.round == g.retries for a in g.attempts_of(kind))
        retry = cause == ErrorKind.INFRA and this_round < self.job_attempts
        retry_after = None
        if retry:
            backoff = min(MAX_BACKOFF_SECONDS, self.retry_backoff_seconds * 2 ** (this_round - 1))
            retry_after = utcnow() + dt.timedelta(seconds=backoff)
            log.warning(
                "%s: %s failed (%s), attempt %d of %d, next in %.0fs: %s",
                g.id,
                attempt.id,
                cause.value,
                this_round,
                self.job_attempts,
                backoff,
                message,
            )
        g = self._update_attempt(
            g,
            kind,
            status=JobStatus.FAILED,
            cause=cause,
            message=message[:1000],
            finished_at=utcnow(),
            retry_after=retry_after,
        )
        if not retry:
            tries = f" after {this_round} attempts" if cause == ErrorKind.INFRA else ""
            self._finish(g, Stage.FAILED, error=f"{kind.value} job {attempt.id} failed{tries}: {message}"[:2000])

    def _record_progress(self, g: Generation, kind: JobKind) -> None:
        progress = read_progress(Layout(g.output).progress)
        if progress is None or progress.phase not in STAGE_OF_PHASE[kind]:
            return
        stage = STAGE_OF_PHASE[kind][progress.phase]
        values = progress.model_dump(mode="json", exclude={"time"}, exclude_none=True)
        if values != g.progress or stage != g.state:
            self._move(g, stage, progress=values)

    def _record_dataset(self, g: Generation) -> Generation:
        stats = DatasetStats.model_validate(storage.read_json(Layout(g.output).stats))
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
        kind = JOB_OF_STAGE.get(g.state)
        attempts = g.attempts_of(kind) if kind else []
        if kind and attempts and attempts[-1].status in (JobStatus.PENDING, JobStatus.RUNNING):
            state = self.jobs.state(attempts[-1].id)
            if state.status.active:
                self.jobs.stop(attempts[-1].id)
                return  # finished once Ray reports it stopped
            if state.status != JobStatus.MISSING:
                g = self._update_attempt(g, kind, status=state.status, finished_at=utcnow())
        self._finish(g, Stage.CANCELLED, error=g.error or "cancelled on request")

    # bookkeeping

    def _move(self, g: Generation, stage: Stage, **changes: Any) -> Generation:
        if stage != g.state:
            check_transition(g.state, stage)
            now = utcnow().isoformat()
            timings = {k: dict(v) for k, v in g.timings.items()}
            if g.stage in timings:
                timings[g.stage]["finished"] = now
            if not stage.finished:
                timings[stage.value] = {"started": now}
            changes["timings"] = timings
            log.info("%s: %s -> %s", g.id, g.stage, stage)
        return self.store.update(g, stage=stage.value, **changes)

    def _finish(self, g: Generation, stage: Stage, **changes: Any) -> Generation:
        if g.state.running:
            self._free_slots += 1  # a generation later in this tick may take its place at once
        return self._move(g, stage, finished_at=utcnow(), **changes)


def wait_for(store: Store, generation_id: str, timeout: float, poll: float = 1.0) -> Generation:
    """Poll the store until a generation is finished (tests and scripts)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        g = store.get(generation_id)
        if g is not None and g.state.finished:
            return g
        time.sleep(poll)
    raise TimeoutError(f"generation {generation_id} not finished after {timeout:.0f}s")
