"""The spec of a generation: one pydantic model shared by the API, the state store and the jobs."""

from __future__ import annotations

from pydantic import BaseModel, Field

from curation.balance import CurationConfig
from trainer.config import TrainConfig
from workers.labeling import LabelConfig


class GenerationConfig(BaseModel):
    """What a user chooses for a Noisy Student iteration: the sources and each stage's settings."""

    teacher: str | None = Field(None, description="model folder URI of the teacher; none: train one on the labeled data")
    labeled: str = Field(description="labeled source: an ImageFolder or a Parquet manifest with uri,label")
    unlabeled: str = Field(description="unlabeled source: a folder of images or a Parquet manifest with a uri column")
    eval: str = Field(description="held-out evaluation source, same forms as labeled; read only by evaluation")
    label: LabelConfig = Field(default_factory=LabelConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    student: TrainConfig = Field(default_factory=TrainConfig)
    teacher_config: TrainConfig | None = Field(None, description="training of the teacher when none is given")


class GenerationSpec(GenerationConfig):
    """One Noisy Student iteration: label the pool with the teacher, curate, fit the student."""

    output: str = Field(description="folder or s3:// prefix for this generation's artifacts")
