"""A generation's artifact layout and the small files its jobs and the control plane exchange.

Everything a generation writes lies under its output folder (a local folder or an ``s3://`` prefix):

    <output>/spec.json          the spec the control plane hands to the generation's jobs
    <output>/teacher/model/     model folder of a teacher trained here (generation 0)
    <output>/teacher/checkpoints/
    <output>/labels/            predictions/*.parquet, rejects/*.parquet, labeling.json; ledger/ and
                                labeling-run.json (resume), source.parquet (a folder source, listed once)
    <output>/dataset/           manifest/*.parquet, stats.json
    <output>/model/             the student's model folder: the next generation's teacher
    <output>/student/           the student before its fine-tune on labeled data, when the spec asks for one
    <output>/checkpoints/       Ray Train checkpoints (resume by re-running)
    <output>/generation.json    what was done, with timings and metrics (a whole generation in one process)
    <output>/progress.json      the running job's progress: ``Progress``
    <output>/jobs/<submission id>/error.json
                                why an attempt of a job failed, as the job understood it: ``JobError``

This module is the only place that spells these names; it imports neither torch nor Ray.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from pydantic import BaseModel, Field

from curation import storage

# The files of a labels folder (``Layout.labels``, or any folder a labeling job writes into).
PREDICTIONS = "predictions"  # Parquet files of the images labeled
REJECTS = "rejects"  # Parquet files of the images skipped, each with its reason
LEDGER = "ledger"  # one entry per committed file: what a resumed job skips
STAGING = "_staging"  # files written, not yet committed
RUN_RECORD = "labeling-run.json"  # the source, model and settings of the run the outputs belong to
RESULT = "labeling.json"  # the counts of a finished job
SOURCE_MANIFEST = "source.parquet"  # a folder source, listed once
SOURCE_SHARDS = "source-shards.parquet"  # the tar shards of a WebDataset folder, listed once
SHARD_SIZES = "shard-sizes"  # images per tar shard, written by the read task that streamed it
LABELING_PROGRESS = "progress"  # each teacher actor's count of images labeled

# The files of a dataset folder (``Layout.dataset``, or any folder a curation job writes into).
MANIFEST = "manifest"  # Parquet files of the curated rows
STATS = "stats.json"  # ``DatasetStats``


@dataclass(frozen=True)
class Layout:
    """The URIs of one generation's artifacts."""

    output: str

    def _at(self, *parts: str) -> str:
        return storage.join(self.output, *parts)

    @property
    def spec(self) -> str:
        return self._at("spec.json")

    @property
    def teacher(self) -> str:
        """Output folder of the teacher trained in this generation (its ``model``, ``checkpoints``)."""
        return self._at("teacher")

    @property
    def teacher_model(self) -> str:
        return self._at("teacher", "model")

    @property
    def labels(self) -> str:
        return self._at("labels")

    @property
    def source_manifest(self) -> str:
        """A folder source, listed once by the labeling job."""
        return self._at("labels", SOURCE_MANIFEST)

    @property
    def dataset(self) -> str:
        return self._at("dataset")

    @property
    def stats(self) -> str:
        return self._at("dataset", STATS)

    @property
    def model(self) -> str:
        return self._at("model")

    @property
    def student(self) -> str:
        """Model folder of the student before its fine-tune (``model`` is then the fine-tuned one)."""
        return self._at("student")

    @property
    def checkpoints(self) -> str:
        return self._at("checkpoints")

    @property
    def summary(self) -> str:
        return self._at("generation.json")

    @property
    def progress(self) -> str:
        return self._at("progress.json")

    def error(self, submission_id: str) -> str:
        return self._at("jobs", submission_id, "error.json")


class Phase(enum.StrEnum):
    """What a running job is doing, as it reports in ``progress.json``."""

    LABELING = "labeling"
    CURATING = "curating"
    TRAINING = "training"
    EVALUATING = "evaluating"


class Progress(BaseModel):
    """The running job's progress, rewritten as it goes; the control plane shows it while the job runs."""

    phase: Phase | None = Field(None, description="labeling, curating, training or evaluating")
    done: int | None = Field(None, description="images labeled (predicted or rejected) so far")
    total: int | None = Field(None, description="images in the unlabeled source")
    step: int | None = Field(None, description="training steps done")
    steps: int | None = Field(None, description="training steps in all")
    loss: float | None = Field(None, description="training loss, averaged over the steps since the last write")
    images_per_second: float | None = Field(
        None, description="training images per second (all workers) since the last write"
    )
    time: float | None = Field(None, description="when it was written (Unix seconds)")


# How often a running job rewrites its progress file, unless its spec says otherwise.
PROGRESS_SECONDS = 2.0


def write_progress(uri: str, phase: Phase, **fields: int | float | None) -> None:
    storage.write_json(uri, Progress(phase=phase, time=time.time(), **fields).model_dump(mode="json"))


def read_progress(uri: str) -> Progress | None:
    """The progress file, or None while there is none (or it cannot be read: progress is best effort)."""
    try:
        return Progress.model_validate(storage.read_json(uri))
    except (OSError, ValueError):
        return None


class ErrorKind(enum.StrEnum):
    """Whose fault a job's failure is: the request's (``user``: running it again cannot help) or the
    cluster's (``infra``: a lost node, out of memory, storage errors; another attempt may finish)."""

    USER = "user"
    INFRA = "infra"


class JobError(BaseModel):
    """``error.json``: written by a job that stops on an error it understands."""

    kind: ErrorKind
    message: str = Field(description="one line for the user: what failed and, for a user error, what to change")
    exception: str = Field("", description="the exception's type")
