"""A generation, stage by stage: teacher (when needed) -> labeling -> curation -> student.

Each stage is a plain function over URIs; the CLI, the Ray job entry points and the tests call them the same
way. Everything a stage writes goes under the generation's output folder:

    <output>/teacher/           model folder of a teacher trained here (generation 0)
    <output>/labels/            predictions/*.parquet, rejects/*.parquet, labeling.json
    <output>/dataset/           manifest/*.parquet, stats.json
    <output>/model/             the student's model folder: the next generation's teacher
    <output>/checkpoints/       Ray Train checkpoints (resume by re-running)
    <output>/generation.json    what was done, with timings and metrics
"""

from __future__ import annotations

import logging
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

from pydantic import BaseModel, Field

from curation import sources
from curation.stats import DatasetStats
from service import storage
from service.specs import GenerationSpec
from trainer import models
from trainer.config import TrainConfig
from trainer.train import TrainResult, train
from workers.curate import curate
from workers.labeling import LabelResult, label

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def code_version() -> str:
    try:
        return version("nstudent")
    except PackageNotFoundError:
        return "unknown"


class GenerationResult(BaseModel):
    generation_id: str
    teacher_uri: str
    teacher_result: TrainResult | None = None
    labeling: LabelResult
    dataset: DatasetStats
    student: TrainResult
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage")


def train_teacher(
    config: TrainConfig, *, labeled: str, eval: str, output: str, run_name: str = "teacher"
) -> TrainResult:
    """Generation 0: a supervised model on the labeled source alone, with the same noise as the students."""
    labeled_table, class_names = sources.labeled_source(labeled)
    eval_table, _ = sources.labeled_source(eval, class_names)
    return train(
        config,
        labeled=labeled_table,
        class_names=class_names,
        eval_set=eval_table,
        model_uri=storage.join(output, "model"),
        storage_path=storage.join(output, "checkpoints"),
        run_name=run_name,
        code_version=code_version(),
    )


def run_generation(spec: GenerationSpec, generation_id: str, progress: Progress = log.info) -> GenerationResult:
    timings: dict[str, float] = {}
    teacher_result = None
    teacher_uri = spec.teacher
    if teacher_uri is None:
        progress(f"{generation_id}: training a teacher on {spec.labeled}")
        t = time.time()
        teacher_out = storage.join(spec.output, "teacher")
        teacher_result = train_teacher(
            spec.teacher_config or spec.student, labeled=spec.labeled, eval=spec.eval, output=teacher_out
        )
        teacher_uri = teacher_result.model_uri
        timings["teacher"] = time.time() - t
    teacher_meta = models.load_meta(teacher_uri)
    labeled_table, class_names = sources.labeled_source(spec.labeled, teacher_meta.class_names)
    eval_table, _ = sources.labeled_source(spec.eval, class_names)

    progress(f"{generation_id}: labeling {spec.unlabeled} with {teacher_meta.architecture}")
    t = time.time()
    labels_uri = storage.join(spec.output, "labels")
    labeling = label(spec.unlabeled, teacher_uri, labels_uri, spec.label, teacher_id=teacher_uri)
    timings["labeling"] = time.time() - t
    progress(f"{generation_id}: {labeling.predicted} labeled, {sum(labeling.rejected.values())} rejected "
             f"{labeling.rejected or ''} in {timings['labeling']:.0f}s")

    t = time.time()
    dataset = curate(
        labeling.predictions_uri,
        storage.join(spec.output, "dataset"),
        class_names,
        spec.curation,
        dataset_id=f"{generation_id}-dataset",
        rejected=labeling.rejected,
        teacher=teacher_uri,
    )
    timings["curation"] = time.time() - t
    progress(f"{generation_id}: curated {dataset.manifest_rows} images ({dataset.manifest_copies} with copies), "
             f"K={dataset.images_per_class}, in {timings['curation']:.0f}s")
    if dataset.manifest_rows == 0:
        raise ValueError(f"{generation_id}: no pseudo-label passed the confidence floor {spec.curation.confidence_floor}")

    progress(f"{generation_id}: training student {spec.student.architecture} for {spec.student.steps} steps")
    t = time.time()
    student = train(
        spec.student,
        labeled=labeled_table,
        class_names=class_names,
        eval_set=eval_table,
        model_uri=storage.join(spec.output, "model"),
        storage_path=storage.join(spec.output, "checkpoints"),
        run_name="student",
        pseudo_manifest_uri=dataset.manifest_uri,
        pseudo_rows=dataset.manifest_copies,
        code_version=code_version(),
    )
    timings["student"] = time.time() - t
    result = GenerationResult(
        generation_id=generation_id,
        teacher_uri=teacher_uri,
        teacher_result=teacher_result,
        labeling=labeling,
        dataset=dataset,
        student=student,
        timings=timings,
    )
    storage.write_json(storage.join(spec.output, "generation.json"), result.model_dump(mode="json"))
    return result
