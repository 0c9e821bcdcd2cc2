"""The spec of a generation: one pydantic model shared by the API, the state store and the jobs."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from curation.balance import CurationConfig
from curation.config import CleanStr, Config
from curation.layout import PROGRESS_SECONDS
from curation.sources import SourceFormat
from trainer.config import FinetuneConfig, TrainConfig
from workers.config import LabelConfig

# A source or model URI: a local path or an s3:// URI, of a sane length.
Uri = Annotated[CleanStr, Field(min_length=1, max_length=4096)]


class GenerationConfig(Config):
    """What a user chooses for a Noisy Student iteration: the sources and each stage's settings."""

    teacher: Uri | None = Field(
        None, description="model folder URI of the teacher; none: train one on the labeled data"
    )
    labeled: Uri = Field(
        description="labeled source: an ImageFolder, a Parquet manifest with uri,label, WebDataset "
        "tar shards with .cls members, or Parquet with image (bytes) and label columns"
    )
    unlabeled: Uri = Field(
        description="unlabeled source: a folder of images, a Parquet manifest with a uri column, "
        "WebDataset tar shards, or Parquet with an image (bytes) column"
    )
    eval: Uri = Field(
        description="held-out test source, same forms as labeled: read only by each model's final evaluation"
    )
    validation: Uri | None = Field(
        None,
        description="held-out validation source, same forms as labeled, evaluated beside the test source: the "
        "split to choose settings on, so that test is read only to report them",
    )
    labeled_format: SourceFormat | None = Field(
        None,
        description="format of the labeled source: files (an ImageFolder), manifest (uri,label), webdataset "
        "(tar shards, labels in .cls members) or parquet-bytes (image bytes and label columns); none: inferred "
        "(.tar: webdataset; Parquet with an image column: parquet-bytes, with uri: manifest; else a folder)",
    )
    unlabeled_format: SourceFormat | None = Field(
        None,
        description="format of the unlabeled source: files, manifest, webdataset (a .tar, or a folder or "
        "prefix of them) or parquet-bytes (Parquet with an image column); none: inferred as for labeled_format",
    )
    eval_format: SourceFormat | None = Field(
        None, description="format of the eval source, as labeled_format; none: inferred"
    )
    validation_format: SourceFormat | None = Field(
        None, description="format of the validation source, as labeled_format; none: inferred"
    )
    label: LabelConfig = Field(default_factory=LabelConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    student: TrainConfig = Field(default_factory=TrainConfig)
    teacher_config: TrainConfig | None = Field(None, description="training of the teacher when none is given")
    finetune: FinetuneConfig | None = Field(
        None,
        description="fine-tune the student on the labeled data alone as the generation's last step; its result "
        "is the generation's model (none: no fine-tune, as in the paper's main results)",
    )
    robustness_baseline: Uri | None = Field(
        None,
        description="model folder whose corruption errors and flip rates the student's mCE and mFR are relative "
        "to; none: the chain's first teacher",
    )
    allow_smaller_student: bool = Field(
        False,
        description="train a student with fewer parameters than its teacher; refused otherwise (a noisy student "
        "is equal to or larger than its teacher)",
    )


class GenerationSpec(GenerationConfig):
    """One Noisy Student iteration: label the pool with the teacher, curate, fit the student."""

    output: str = Field(description="folder or s3:// prefix for this generation's artifacts")
    roots: list[str] | None = Field(
        None,
        description="folders and s3:// prefixes the jobs may read from, checked at every read (the control "
        "plane sets them from the principal's roots); none: anywhere, for a generation run from the command line",
    )
    progress_seconds: float = Field(
        PROGRESS_SECONDS,
        gt=0,
        le=3600,
        description="seconds between two writes of a running job's progress file (the control plane sets it "
        "from its own setting)",
    )
