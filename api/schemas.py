"""What the API reads and returns: one schema family per resource."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from curation.layout import Progress
from curation.stats import DatasetStats
from service.specs import GenerationConfig, Uri
from service.states import Attempt, Stage
from trainer.config import TrainConfig

# Offsets past any real listing (and past what a 64-bit database integer holds) are refused up front.
MAX_OFFSET = 10**12


class Page(BaseModel):
    """Paging query parameters; an unknown parameter (a typo such as `limt`) is a 422, not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    offset: int = Field(0, ge=0, le=MAX_OFFSET)
    limit: int = Field(50, ge=1, le=1000)


class GenerationQuery(Page):
    stage: Stage | None = Field(None, description="only generations at this stage")


class ManifestQuery(Page):
    limit: int = Field(100, ge=1, le=1000)


class GenerationCreate(GenerationConfig):
    """Start a Noisy Student iteration, or a chain of them (each student teaches the next)."""

    model_config = ConfigDict(extra="forbid")

    teacher: Uri | None = Field(
        None,
        description="a previous generation's id (g-...), a model folder URI, or none: train a teacher on the "
        "labeled data first",
    )
    iterations: int = Field(1, ge=1, le=20, description="generations to chain, each taught by the one before")
    students: list[TrainConfig] | None = Field(
        None,
        max_length=20,
        description="one student config per generation of the chain, as many as iterations (the paper's "
        "students grow from one generation to the next); none: `student` for every generation",
    )

    @model_validator(mode="after")
    def _one_student_per_generation(self) -> GenerationCreate:
        if self.students is not None and len(self.students) != self.iterations:
            raise ValueError(f"students: {len(self.students)} configs for {self.iterations} iterations")
        return self


class StageTiming(BaseModel):
    started: dt.datetime
    finished: dt.datetime | None = None
    seconds: float | None = None


class GenerationPublic(BaseModel):
    id: str
    chain_id: str = Field(description="id of the first generation of the request that made this one")
    chain_index: int
    parent_id: str | None = Field(description="the generation whose model teaches this one, if any")
    stage: Stage
    cancel_requested: bool
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    spec: dict[str, Any] = Field(description="the request's sources and settings (teacher resolved to a URI)")
    output: str = Field(description="folder or s3:// prefix holding this generation's artifacts")
    teacher_uri: str | None
    model_uri: str | None = Field(description="the student's model folder once it succeeded")
    dataset_id: str | None
    jobs: dict[str, list[Attempt]] = Field(
        description="by kind (teacher, label, train): every attempt of the job, its Ray submission id, status and "
        "the cause of its failure"
    )
    retries: int = Field(description="times a user asked to run it again after it failed or was cancelled")
    created_by: str = Field(description="the principal whose token created it")
    progress: Progress
    timings: dict[str, StageTiming] = Field(description="per stage: when it started and finished")
    metrics: dict[str, float] = Field(description="the student's evaluation: test_accuracy, ...")
    error: str | None
    links: dict[str, str]


class GenerationsPublic(BaseModel):
    data: list[GenerationPublic]
    count: int = Field(description="generations matching, over all pages")


class GenerationAccepted(BaseModel):
    id: str = Field(description="the first generation of the chain")
    chain: list[str] = Field(description="every generation the request made, in order")
    links: dict[str, str]


class DatasetPublic(DatasetStats):
    generation_id: str
    created_at: dt.datetime
    links: dict[str, str]


class ManifestRow(BaseModel):
    image_id: int
    uri: str
    label: int
    confidence: float
    copies: int = Field(description="times the student sees the image per pass over the manifest")


class ManifestPage(BaseModel):
    data: list[ManifestRow]
    count: int = Field(description="rows in the whole manifest")
    offset: int
    limit: int


class ModelPublic(BaseModel):
    generation_id: str
    uri: str = Field(description="model folder: weights (safetensors) and model.json; loadable as a teacher")
    architecture: str
    class_names: list[str]
    input_size: int
    parameters: int
    metrics: dict[str, float]
    code_version: str


class AuditPublic(BaseModel):
    at: dt.datetime
    principal: str
    action: str = Field(description="create, cancel or retry")
    target: str = Field(description="the generation (the first of a chain for create)")
    detail: dict[str, Any]


class AuditsPublic(BaseModel):
    data: list[AuditPublic]
    count: int


class Problem(BaseModel):
    detail: Any = Field(description="what is wrong: a message, or a list of {loc, msg, type} for invalid fields")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    problems: dict[str, str] = Field(default_factory=dict)
