"""The comparisons a reader of the paper asks for, on the bundled digits, over seeds.

For each seed (which also changes which digits are labeled, validation and pool), under ``<out>/seed-<s>/``:

    teacher        the demo's teacher (gen 0)
    student-<g>    the demo's chain of noisy students, generations 1..G
    supervised     the budget-matched baseline of the final student: its architecture, noise, steps and images
                   per step, all of them labeled
    supervised-redraw  the same baseline with the next training seed: the gains are over the mean of the two,
                   since the baseline's training seed alone moves it by most of a point
    no-noise-<g>   the same chain with no input noise (RandAugment, crop, flip, erasing) and no model noise
                   (dropout, stochastic depth): no-noise-1 learns from the teacher's labels, each later one from
                   the labels of the no-noise student before it
    soft-labels    generation 1 on the teacher's soft labels instead of its top-1 (smoothed), the demo's choice
                   (hard-labels when the students are on soft labels)
    no-balancing   generation 1 on every pseudo-label over the floor once, classes not balanced
    larger         generation 1 with a student wider than the chain's (``LARGER``)
    true-labels    the ceiling of pseudo-labeling: the baseline's config on the labeled images and the pool with
                   its true labels, as if the teacher made no mistake (the pool's truth is read by no other arm)

The generation-1 variants (no-noise-1 among them) reuse generation 1's labels. Robustness (mCE, mFR) is relative
to the first supervised baseline of the seed. Every setting of the demo was chosen on validation; test is reported.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from curation import sources
from curation.layout import Layout
from service import demo, digits, pipeline
from service.specs import GenerationSpec
from trainer import models, robustness
from trainer.config import NoiseConfig, TrainConfig
from trainer.train import TrainResult
from workers.curate import curate

# The generation-1 variant with a student larger than the chain's: test_resnet's widths times three.
LARGER = {**demo.STUDENT_WIDTH, "channels": [96, 144, 144, 288]}
NO_NOISE = NoiseConfig(randaugment_ops=0, randaugment_magnitude=0, randaugment_magnitude_std=0, dropout=0, drop_path=0)
# Besides student-<g> and no-noise-<g>, one of each per generation.
ARMS = ("teacher", "supervised", "supervised-redraw", "soft-labels", "no-balancing", "larger", "true-labels")
# The draws of the budget-matched baseline: the gains are over their mean.
BASELINES = ("supervised", "supervised-redraw")


def labels_arm(student: TrainConfig) -> str:
    """The generation-1 variant on the other kind of targets than the chain's."""
    return "hard-labels" if student.soft_targets else "soft-labels"


class Arm(BaseModel):
    seed: int
    arm: str
    parameters: int
    steps: int
    validation_accuracy: float
    validation_loss: float | None = None  # mean cross-entropy on validation (models trained before it was kept: none)
    test_accuracy: float
    mce: float | None
    mfr: float | None
    flip_rate: float | None
    seconds: float


def run(
    out: str,
    seeds: list[int],
    *,
    generations: int = 3,
    teacher_steps: int = 400,
    student_steps: int = 1000,
    robustness_images: int = demo.ROBUSTNESS_IMAGES,
    progress: Callable[[str], None] = print,
) -> list[Arm]:
    """Run every arm for every seed under ``out``; write ``experiment.json`` and return the rows. Each model's
    robustness suites run on ``robustness_images`` test images.

    Run again on the same ``out``, it picks up where it stopped: an arm whose model folder holds a model trained
    with the same config, from reused arms upstream, is read back instead of trained again."""
    out = os.path.abspath(out)
    summary = os.path.join(out, "experiment.json")
    earlier = [Arm(**r) for r in json.loads(Path(summary).read_text())] if os.path.exists(summary) else []
    rows: list[Arm] = []
    for seed in seeds:
        steps = {"teacher": teacher_steps, "student": student_steps}
        seconds = {r.arm: r.seconds for r in earlier if r.seed == seed}
        rows += _seed(os.path.join(out, f"seed-{seed}"), seed, generations, steps, robustness_images, seconds, progress)
        with open(summary, "w") as f:  # after each seed: a partial run is readable
            json.dump([r.model_dump() for r in rows], f, indent=2)
    return rows


class _Arms:
    """One seed's arms, each in ``<out>/<arm>/``: trained, or read back when an earlier run finished it with the
    same config and nothing upstream of it was trained again."""

    def __init__(self, out: str, seconds: dict[str, float], progress: Callable[[str], None]) -> None:
        self.out, self.seconds, self.progress = out, seconds, progress
        self.results: dict[str, tuple[TrainResult, float, int]] = {}  # arm -> (result, seconds, steps)
        self.trained: set[str] = set()

    def output(self, arm: str) -> str:
        return os.path.join(self.out, arm)

    def finished(self, arm: str, config: TrainConfig, after: tuple[str, ...]) -> TrainResult | None:
        """The earlier run's model of ``arm``, if it may stand; else None, with the arm's folder cleared when it
        holds another config's model or one made from a model trained again since."""
        uri = Layout(self.output(arm)).model
        try:
            meta = models.load_meta(uri)
        except ValueError:
            meta = None  # not finished: training resumes from the arm's last checkpoint, if any
        upstream_trained = bool(self.trained.intersection(after))
        if meta is not None and meta.config == config.model_dump(mode="json") and not upstream_trained:
            self.progress(f"{arm}: reusing {uri} (trained earlier with the same config)")
            seconds = self.seconds.get(arm, meta.metrics.get("train_loop_seconds", 0.0))
            result = TrainResult(model_uri=uri, metrics=meta.metrics, parameters=meta.parameters, seconds=seconds)
            self.results[arm] = result, seconds, config.steps
            return result
        if meta is not None or upstream_trained:
            shutil.rmtree(self.output(arm), ignore_errors=True)
        self.trained.add(arm)
        return None

    def done(self, arm: str, result: TrainResult, started: float, config: TrainConfig) -> TrainResult:
        self.results[arm] = result, time.time() - started, config.steps
        return result


def _seed(
    out: str,
    seed: int,
    generations: int,
    steps: dict[str, int],
    robustness_images: int,
    seconds: dict[str, float],
    progress: Callable[[str], None],
) -> list[Arm]:
    student_steps = steps["student"]

    def student_config(seed: int) -> TrainConfig:
        return demo.student_config(seed, student_steps, robustness_images)

    data = digits.write(os.path.join(out, "data"), seed=seed)
    arms = _Arms(out, seconds, lambda line: progress(f"seed {seed}: {line}"))

    def fit(arm: str, config: TrainConfig, labeled: str = data["labeled"]) -> TrainResult:
        if result := arms.finished(arm, config, after=()):
            return result
        arms.progress(f"{arm} ({config.architecture} {config.model_kwargs or ''}, {config.steps} steps)")
        t = time.time()
        result = pipeline.train_teacher(
            config, labeled=labeled, eval=data["test"], validation=data["validation"], output=arms.output(arm)
        )
        return arms.done(arm, result, t, config)

    def generation(arm: str, teacher: str, teacher_uri: str, student: TrainConfig) -> pipeline.GenerationResult:
        """A generation taught by the model of arm ``teacher``."""
        spec = demo.generation_spec(data, teacher_uri, arms.output(arm), seed, student)
        summary = Layout(spec.output).summary
        if arms.finished(arm, student, after=(teacher,)) and os.path.exists(summary):
            return pipeline.GenerationResult.model_validate_json(Path(summary).read_text())
        arms.trained.add(arm)  # also when its model stands but the generation's summary is missing
        arms.progress(arm)
        t = time.time()
        result = pipeline.run_generation(spec, arm, progress=progress)
        arms.done(arm, result.student, t, student)
        return result

    teacher = fit("teacher", demo.teacher_config(seed, steps["teacher"], robustness_images))
    model_uri, first, upstream = teacher.model_uri, None, "teacher"
    for g in range(1, generations + 1):
        student = student_config(seed + g)
        made = generation(f"student-{g}", upstream, model_uri, student)
        model_uri, first, upstream = made.student.model_uri, first or made, f"student-{g}"
    assert first is not None
    matched = demo.supervised_config(student)
    fit("supervised", matched)
    fit("supervised-redraw", matched.model_copy(update={"seed": matched.seed + 1}))
    fit("true-labels", matched, labeled=true_labels(data))

    # Generation-1 variants: the same teacher and labels as student-1.
    gen1 = demo.generation_spec(data, teacher.model_uri, "", seed, student_config(seed + 1))

    def variant(arm: str, spec: GenerationSpec) -> TrainResult:
        if result := arms.finished(arm, spec.student, after=("teacher", "student-1")):
            return result
        arms.progress(arm)
        t = time.time()
        spec = spec.model_copy(update={"output": arms.output(arm)})
        dataset = first.dataset
        if spec.curation != gen1.curation:
            dataset = curate(
                first.labeling.predictions_uri,
                Layout(spec.output).dataset,
                models.load_meta(teacher.model_uri).class_names,
                spec.curation,
                dataset_id=f"{arm}-dataset",
                rejected=first.labeling.rejected,
                teacher=teacher.model_uri,
            )
        model, _ = pipeline.student_stage(spec, dataset)
        return arms.done(arm, model, t, spec.student)

    def gen1_with(**changes: Any) -> GenerationSpec:
        return gen1.model_copy(update={"student": gen1.student.model_copy(update=changes)})

    # The chain without noise: each no-noise student labels the pool for the next.
    model_uri = variant("no-noise-1", gen1_with(noise=NO_NOISE)).model_uri
    for g in range(2, generations + 1):
        quiet = student_config(seed + g).model_copy(update={"noise": NO_NOISE})
        model_uri = generation(f"no-noise-{g}", f"no-noise-{g - 1}", model_uri, quiet).student.model_uri
    variant(labels_arm(gen1.student), gen1_with(soft_targets=not gen1.student.soft_targets))
    variant("no-balancing", gen1.model_copy(update={"curation": gen1.curation.model_copy(update={"balance": False})}))
    variant("larger", gen1_with(model_kwargs=LARGER))

    baseline = arms.results["supervised"][0].metrics
    rows = []
    for arm, (result, arm_seconds, arm_steps) in arms.results.items():
        m = result.metrics
        relative = robustness.relative(m, baseline)
        rows.append(
            Arm(
                seed=seed,
                arm=arm,
                parameters=result.parameters,
                steps=arm_steps,
                validation_accuracy=m["validation_accuracy"],
                validation_loss=m.get("validation_loss"),
                test_accuracy=m["test_accuracy"],
                mce=relative.get("mce"),
                mfr=relative.get("mfr"),
                flip_rate=m.get("flip_rate"),
                seconds=arm_seconds,
            )
        )
    return rows


def true_labels(data: dict[str, str]) -> str:
    """A Parquet manifest (uri, label) of the labeled split and the whole pool with its true labels, written
    once beside the digits."""
    path = os.path.join(os.path.dirname(data["unlabeled_truth"]), "true_labels.parquet")
    if not os.path.exists(path):
        labeled, names = sources.labeled_source(data["labeled"])
        listed = sources.unlabeled_manifest(data["unlabeled"])
        pool = listed.join(pq.read_table(data["unlabeled_truth"]), "image_id", join_type="inner")
        if pool.num_rows != listed.num_rows:
            raise ValueError(f"{data['unlabeled_truth']} does not hold the label of every image in the pool")
        uris = labeled.column("uri").to_pylist() + pool.column("uri").to_pylist()
        labels = [names[i] for i in labeled.column("label").to_pylist()]
        labels += [digits.CLASSES[i] for i in pool.column("label").to_pylist()]
        table = pa.table({"uri": pa.array(uris, pa.string()), "label": pa.array(labels, pa.string())})
        pq.write_table(table, path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def table(rows: list[Arm]) -> list[dict[str, Any]]:
    """One line per arm: the mean and standard deviation over seeds of each figure, and the gain in test
    accuracy over the supervised baseline (mean over seeds of the difference from the mean of the seed's
    baseline draws)."""
    seeds = sorted({r.seed for r in rows})
    by = {(r.seed, r.arm): r for r in rows}
    baseline = {
        s: statistics.fmean(draws)
        for s in seeds
        if (draws := [by[(s, b)].test_accuracy for b in BASELINES if (s, b) in by])
    }
    order = [a for a in dict.fromkeys(r.arm for r in rows)]
    lines = []
    for arm in order:
        got = [by[(s, arm)] for s in seeds if (s, arm) in by]
        gain = [by[(s, arm)].test_accuracy - baseline[s] for s in seeds if (s, arm) in by and s in baseline]
        lines.append(
            {
                "arm": arm,
                "seeds": len(got),
                "parameters": got[0].parameters,
                "steps": got[0].steps,
                **_stats("validation_accuracy", [r.validation_accuracy for r in got]),
                **_stats("validation_loss", [r.validation_loss for r in got if r.validation_loss is not None]),
                **_stats("test_accuracy", [r.test_accuracy for r in got]),
                **_stats("gain_over_supervised", gain),
                **_stats("mce", [r.mce for r in got if r.mce is not None]),
                **_stats("mfr", [r.mfr for r in got if r.mfr is not None]),
            }
        )
    return lines


def _stats(name: str, values: list[float]) -> dict[str, float | None]:
    if not values:
        return {name: None, f"{name}_sd": None}
    return {name: statistics.fmean(values), f"{name}_sd": statistics.stdev(values) if len(values) > 1 else 0.0}
