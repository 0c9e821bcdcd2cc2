"""A generation's stages, its jobs and their states, and the one table of the moves between stages.

    queued ──> training_teacher ──> labeling ──> curating ──> training ──> evaluating ──> succeeded
       │      (no teacher given)        └──────────────────────┘  (an empty pool curates nothing)
       └── any stage that is not finished ──> failed | cancelled ──(POST .../retry)──> queued

A job that fails for an infrastructure reason is submitted again while its generation stays at its stage,
so a retry of a job never shows as a move here; only a retry requested by a user goes back to ``queued``.
"""

from __future__ import annotations

import datetime as dt
import enum

from pydantic import BaseModel, Field

from curation.layout import ErrorKind, Phase


class Stage(enum.StrEnum):
    QUEUED = "queued"
    TRAINING_TEACHER = "training_teacher"
    LABELING = "labeling"
    CURATING = "curating"
    TRAINING = "training"
    EVALUATING = "evaluating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in TERMINAL

    @property
    def running(self) -> bool:
        """A job of the generation is on the cluster (or about to be): it holds one of the running slots."""
        return self in JOB_OF_STAGE


TERMINAL = frozenset({Stage.SUCCEEDED, Stage.FAILED, Stage.CANCELLED})


class JobKind(enum.StrEnum):
    """The Ray jobs of a generation, in the order they run (``teacher`` only when no teacher is given)."""

    TEACHER = "teacher"
    LABEL = "label"
    TRAIN = "train"


class JobStatus(enum.StrEnum):
    """Ray's job statuses, and ``MISSING`` when the cluster has no job of that submission id."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    MISSING = "MISSING"

    @property
    def active(self) -> bool:
        return self in (JobStatus.PENDING, JobStatus.RUNNING)


# The job that runs during each active stage, the stage each job starts in, and the stage each phase that a
# job reports in progress.json stands for.
JOB_OF_STAGE = {
    Stage.TRAINING_TEACHER: JobKind.TEACHER,
    Stage.LABELING: JobKind.LABEL,
    Stage.CURATING: JobKind.LABEL,
    Stage.TRAINING: JobKind.TRAIN,
    Stage.EVALUATING: JobKind.TRAIN,
}
FIRST_STAGE = {JobKind.TEACHER: Stage.TRAINING_TEACHER, JobKind.LABEL: Stage.LABELING, JobKind.TRAIN: Stage.TRAINING}
STAGE_OF_PHASE = {
    JobKind.TEACHER: {Phase.TRAINING: Stage.TRAINING_TEACHER, Phase.EVALUATING: Stage.TRAINING_TEACHER},
    JobKind.LABEL: {Phase.LABELING: Stage.LABELING, Phase.CURATING: Stage.CURATING},
    JobKind.TRAIN: {Phase.TRAINING: Stage.TRAINING, Phase.EVALUATING: Stage.EVALUATING},
}

_ENDS = {Stage.FAILED, Stage.CANCELLED}
# Every move a generation may make. A job submitted again after a failure reports its first phase again, so
# curating may go back to labeling and evaluating to training.
TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.QUEUED: frozenset({Stage.TRAINING_TEACHER, Stage.LABELING, Stage.TRAINING, *_ENDS}),
    Stage.TRAINING_TEACHER: frozenset({Stage.LABELING, *_ENDS}),
    Stage.LABELING: frozenset({Stage.CURATING, Stage.TRAINING, *_ENDS}),
    Stage.CURATING: frozenset({Stage.LABELING, Stage.TRAINING, *_ENDS}),
    Stage.TRAINING: frozenset({Stage.EVALUATING, Stage.SUCCEEDED, *_ENDS}),
    Stage.EVALUATING: frozenset({Stage.TRAINING, Stage.SUCCEEDED, *_ENDS}),
    Stage.SUCCEEDED: frozenset(),
    Stage.FAILED: frozenset({Stage.QUEUED}),
    Stage.CANCELLED: frozenset({Stage.QUEUED}),
}


class IllegalTransition(RuntimeError):
    """A move that the table does not allow: a defect in the orchestrator, never the user's doing."""


def check_transition(current: Stage, new: Stage) -> None:
    if new != current and new not in TRANSITIONS[current]:
        raise IllegalTransition(f"a generation cannot go from {current} to {new}")


class Attempt(BaseModel):
    """One submission of one job. Its id is written to the database before it is submitted, so a control plane
    restarted at any moment submits it at most once."""

    id: str = Field(description="Ray submission id: <generation>-<kind>-<n>")
    n: int = Field(ge=1, description="attempt number of this job, over all retries")
    round: int = Field(0, ge=0, description="the user's retries of the generation when this attempt was made")
    submitted: bool = Field(False, description="the Jobs API accepted it")
    status: JobStatus = JobStatus.PENDING
    cause: ErrorKind | None = Field(None, description="why it failed: user (fix the request) or infra")
    message: str | None = Field(None, description="the failure in one line")
    created_at: dt.datetime
    finished_at: dt.datetime | None = None
    retry_after: dt.datetime | None = Field(None, description="when the next attempt may be submitted")
