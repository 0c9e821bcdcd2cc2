"""A generation, stage by stage: teacher (when needed) -> labeling -> curation -> student.

Each stage is a plain function over URIs; the CLI, the Ray job entry points and the tests call them the same
way. Everything a stage writes goes under the generation's output folder, laid out by ``curation.layout``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from importlib.metadata import PackageNotFoundError, version

import pyarrow as pa
from pydantic import BaseModel, Field

from curation import access, shards, sources, storage
from curation.errors import UserError
from curation.layout import LABELING_PROGRESS, PROGRESS_SECONDS, Layout, Phase, write_progress
from curation.sources import SourceFormat
from curation.stats import DatasetStats
from service.specs import GenerationSpec
from trainer import models
from trainer.config import TrainConfig
from trainer.meta import ModelMeta, ModelShape
from trainer.train import TrainResult, train
from workers import ledger
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
    student: TrainResult = Field(description="the generation's model: the student, fine-tuned when asked")
    unfinetuned: TrainResult | None = Field(None, description="the student before its fine-tune, if any")
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage")


def train_teacher(
    config: TrainConfig,
    *,
    labeled: str,
    eval: str,
    output: str,
    run_name: str = "teacher",
    progress_uri: str | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
    labeled_format: SourceFormat | None = None,
    eval_format: SourceFormat | None = None,
    validation: str | None = None,
    validation_format: SourceFormat | None = None,
    roots: list[str] | None = None,
) -> TrainResult:
    """Generation 0: a supervised model on the labeled source alone, with the noise of its own config."""
    labeled_table, class_names = sources.labeled_source(labeled, fmt=labeled_format)
    check_rows("labeled", labeled_table, roots)
    check_readable("init_from", config.init_from, roots)
    return train(
        config,
        labeled=labeled_table,
        class_names=class_names,
        eval_set=held_out("eval", eval, class_names, eval_format, roots),
        validation_set=held_out("validation", validation, class_names, validation_format, roots),
        model_uri=Layout(output).model,
        storage_path=Layout(output).checkpoints,
        run_name=run_name,
        code_version=code_version(),
        progress_uri=progress_uri,
        progress_seconds=progress_seconds,
    )


def teacher_stage(spec: GenerationSpec) -> TrainResult:
    """Generation 0 when the spec names no teacher: train one on the labeled source."""
    return train_teacher(
        spec.teacher_config or spec.student,
        labeled=spec.labeled,
        eval=spec.eval,
        labeled_format=spec.labeled_format,
        eval_format=spec.eval_format,
        validation=spec.validation,
        validation_format=spec.validation_format,
        output=Layout(spec.output).teacher,
        progress_uri=Layout(spec.output).progress,
        progress_seconds=spec.progress_seconds,
        roots=spec.roots,
    )


def held_out(
    name: str, uri: str | None, class_names: list[str], fmt: SourceFormat | None, roots: list[str] | None
) -> pa.Table | None:
    """A held-out labeled set (test or validation) in the model's classes, its rows checked against the roots."""
    if uri is None:
        return None
    table, _ = sources.labeled_source(uri, class_names, fmt)
    check_rows(name, table, roots)
    return table


def check_readable(name: str, uri: str | None, roots: list[str] | None) -> None:
    """``uri`` (a model folder, say) lies under ``roots``; else a UserError naming ``name``."""
    if uri is not None and roots is not None:
        access.ReadPolicy(tuple(roots)).require(name, uri)


def check_rows(name: str, table: pa.Table, roots: list[str] | None) -> None:
    """Every image a labeled or eval set names lies under ``roots``; else a UserError naming the first rows that
    do not (a labeled set is the ground truth: a row that may not be read is a bad request, not a reject)."""
    if roots is None:
        return
    outside = []
    for uri in table.column("uri").to_pylist():
        container = shards.split(uri)
        try:
            ok = access.under(access.normalize(container[0] if container else uri), roots)
        except access.BadUri:
            ok = False
        if not ok:
            outside.append(uri)
    if outside:
        raise UserError(f"{name}: {len(outside)} images lie outside the allowed roots, e.g. {outside[:3]}")


def check_student_size(spec: GenerationSpec, teacher: ModelMeta) -> None:
    """A student with fewer parameters than its teacher is a UserError unless the spec allows it."""
    if spec.allow_smaller_student or not teacher.parameters:  # 0: a folder that does not say
        return
    shape = ModelMeta(**spec.student.model_dump(include=set(ModelShape.model_fields)), class_names=teacher.class_names)
    parameters = models.count_parameters(models.create(shape))
    if parameters < teacher.parameters:
        raise UserError(
            f"the student {spec.student.architecture} has {parameters:,} parameters, fewer than its teacher's "
            f"{teacher.parameters:,} ({teacher.architecture}): a noisy student is equal to or larger than its "
            "teacher; choose a larger student, or set allow_smaller_student"
        )


def teacher_of(spec: GenerationSpec) -> str:
    return spec.teacher or Layout(spec.output).teacher_model


def label_stage(
    spec: GenerationSpec,
    generation_id: str,
    dataset_id: str,
    progress: Progress = log.info,
    timings: dict[str, float] | None = None,
) -> tuple[LabelResult, DatasetStats]:
    """Label the unlabeled pool with the teacher, then curate the predictions into a manifest; the seconds
    of each go into ``timings`` (labeling, curation)."""
    timings = {} if timings is None else timings
    teacher_uri = teacher_of(spec)
    teacher_meta = models.load_meta(teacher_uri)
    progress(f"{generation_id}: labeling {spec.unlabeled} with {teacher_meta.architecture}")
    t = time.time()
    layout = Layout(spec.output)
    labels_uri = layout.labels
    with LabelingProgress(spec.unlabeled, layout, spec.progress_seconds):
        labeling = label(
            spec.unlabeled,
            teacher_uri,
            labels_uri,
            spec.label,
            teacher_id=teacher_uri,
            source_format=spec.unlabeled_format,
            roots=spec.roots,
            progress_seconds=spec.progress_seconds,
        )
    timings["labeling"] = time.time() - t
    progress(
        f"{generation_id}: {labeling.predicted} labeled, {sum(labeling.rejected.values())} rejected "
        f"{labeling.rejected or ''} in {timings['labeling']:.0f}s"
    )
    t = time.time()
    write_progress(layout.progress, Phase.CURATING)
    dataset = curate(
        labeling.predictions_uri,
        layout.dataset,
        teacher_meta.class_names,
        spec.curation,
        dataset_id=dataset_id,
        rejected=labeling.rejected,
        teacher=teacher_uri,
    )
    timings["curation"] = time.time() - t
    progress(
        f"{generation_id}: curated {dataset.manifest_rows} images ({dataset.manifest_copies} with copies), "
        f"K={dataset.images_per_class}, in {timings['curation']:.0f}s"
    )
    if dataset.manifest_rows == 0:
        raise UserError(
            f"{generation_id}: no pseudo-label passed the confidence floor "
            f"{spec.curation.confidence_floor}: lower curation.confidence_floor, or give a better teacher"
        )
    return labeling, dataset


def student_stage(spec: GenerationSpec, dataset: DatasetStats) -> tuple[TrainResult, TrainResult | None]:
    """Fit the noisy student on the labeled source plus the curated manifest, then fine-tune it on the labeled
    source alone when the spec asks. Returns (the generation's model, the student before its fine-tune or
    None). The student's mCE and mFR are relative to the spec's robustness baseline."""
    teacher = models.load_meta(teacher_of(spec))
    class_names = teacher.class_names
    check_student_size(spec, teacher)
    check_readable("init_from", spec.student.init_from, spec.roots)
    labeled_table, _ = sources.labeled_source(spec.labeled, class_names, spec.labeled_format)
    check_rows("labeled", labeled_table, spec.roots)
    layout = Layout(spec.output)
    run = partial(
        train,
        labeled=labeled_table,
        class_names=class_names,
        eval_set=held_out("eval", spec.eval, class_names, spec.eval_format, spec.roots),
        validation_set=held_out("validation", spec.validation, class_names, spec.validation_format, spec.roots),
        storage_path=layout.checkpoints,
        code_version=code_version(),
        progress_uri=layout.progress,
        progress_seconds=spec.progress_seconds,
        robustness_baseline=robustness_baseline(spec),
    )
    student = run(
        spec.student,
        model_uri=layout.student if spec.finetune else layout.model,
        run_name="student",
        pseudo_manifest_uri=dataset.manifest_uri,
        pseudo_rows=dataset.manifest_copies,
    )
    if spec.finetune is None:
        return student, None
    return run(spec.finetune.of(spec.student, student.model_uri), model_uri=layout.model, run_name="finetune"), student


def robustness_baseline(spec: GenerationSpec) -> str:
    """The model folder the student's robustness is relative to: the spec's baseline, else its teacher (the
    control plane names the chain's first teacher)."""
    uri = spec.robustness_baseline or teacher_of(spec)
    check_readable("robustness_baseline", uri, spec.roots)
    try:
        models.load_meta(uri)
    except (OSError, ValueError) as e:
        raise UserError(f"robustness_baseline {uri}: not a model folder ({e})") from None
    return uri


def run_generation(spec: GenerationSpec, generation_id: str, progress: Progress = log.info) -> GenerationResult:
    """All stages in this process, one after the other (the CLI and the tests)."""
    timings: dict[str, float] = {}
    teacher_result = None
    if spec.teacher is None:
        progress(f"{generation_id}: training a teacher on {spec.labeled}")
        t = time.time()
        teacher_result = teacher_stage(spec)
        timings["teacher"] = time.time() - t
    labeling, dataset = label_stage(spec, generation_id, f"{generation_id}-dataset", progress, timings)
    progress(f"{generation_id}: training student {spec.student.architecture} for {spec.student.steps} steps")
    t = time.time()
    student, unfinetuned = student_stage(spec, dataset)
    timings["student"] = time.time() - t
    result = GenerationResult(
        generation_id=generation_id,
        teacher_uri=teacher_of(spec),
        teacher_result=teacher_result,
        labeling=labeling,
        dataset=dataset,
        student=student,
        unfinetuned=unfinetuned,
        timings=timings,
    )
    storage.write_json(Layout(spec.output).summary, result.model_dump(mode="json"))
    return result


class LabelingProgress:
    """While labeling runs, count the rows labeled and publish done/total.

    Runs in the job's driver beside Ray Data. Rows are counted two ways, and the larger count wins: the rows
    in the files written so far (Parquet footers; files are immutable once written, so each footer is read
    once), and the rows the teacher actors report in ``labels/progress/`` on top of those written before this
    run (files are written only every ``rows_per_file`` rows, the actors' counts every few seconds).
    """

    def __init__(self, source_uri: str, layout: Layout, every: float = PROGRESS_SECONDS):
        self.source_uri, self.layout, self.every = source_uri, layout, every
        self.rows: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="labeling-progress", daemon=True)

    def __enter__(self) -> LabelingProgress:
        self.actors = storage.join(self.layout.labels, LABELING_PROGRESS)
        try:
            storage.delete_dir_contents(self.actors)  # counts of an earlier run are not this one's
            self.before = self._written()
            write_progress(self.layout.progress, Phase.LABELING, done=self.before, total=self._total())
        except Exception:  # progress is best effort; labeling goes on
            log.warning("labeling progress failed", exc_info=True)
            self.before = 0
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def _total(self) -> int | None:
        manifest = self.source_uri if sources.is_manifest(self.source_uri) else self.layout.source_manifest
        return storage.parquet_rows(manifest)

    def _written(self) -> int:
        for part in (ledger.PREDICTIONS, ledger.REJECTS):
            for uri in storage.list_files(storage.join(self.layout.labels, part), suffix=".parquet"):
                if uri not in self.rows:
                    rows = storage.parquet_rows(uri)
                    if rows is not None:
                        self.rows[uri] = rows
        return sum(self.rows.values())

    def _labeled_by_actors(self) -> int:
        rows = 0
        for uri in storage.list_files(self.actors, suffix=".json"):
            try:
                rows += int(storage.read_json(uri)["rows"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being rewritten: next time
        return rows

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                done = max(self._written(), self.before + self._labeled_by_actors())
                total = self._total()
                write_progress(
                    self.layout.progress, Phase.LABELING, done=min(done, total) if total else done, total=total
                )
            except Exception:  # progress is best effort; labeling goes on
                log.warning("labeling progress failed", exc_info=True)
