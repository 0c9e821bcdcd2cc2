"""The comparisons a reader of the paper asks for, on the bundled digits, over seeds.

For each seed (which also changes which digits are labeled, validation and pool), under ``<out>/seed-<s>/``:

    teacher        the demo's teacher (gen 0)
    student-<g>    the demo's chain of noisy students, generations 1..G
    supervised     the budget-matched baseline of the final student: its architecture, noise, steps and images
                   per step, all of them labeled
    no-noise       generation 1 with no input noise (RandAugment, crop, flip, erasing) and no model noise
                   (dropout, stochastic depth)
    soft-labels    generation 1 on the teacher's soft labels instead of its top-1 (smoothed), the demo's choice
                   (hard-labels when the students are on soft labels)
    no-balancing   generation 1 on every pseudo-label over the floor once, classes not balanced
    larger         generation 1 with a student wider than its teacher (``LARGER``)

The generation-1 variants reuse generation 1's labels. Robustness (mCE, mFR) is relative to the supervised
baseline of the same seed. Every setting of the demo was chosen on validation; test is reported.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from curation.layout import Layout
from service import demo, digits, pipeline
from trainer import models, robustness
from trainer.config import NoiseConfig, TrainConfig
from trainer.train import TrainResult
from workers.curate import curate

# The generation-1 variant with a student wider than the teacher: test_resnet's widths times two.
LARGER = {"channels": [64, 96, 96, 192]}
NO_NOISE = NoiseConfig(randaugment_ops=0, randaugment_magnitude=0, randaugment_magnitude_std=0, dropout=0, drop_path=0)
ARMS = ("teacher", "supervised", "no-noise", "soft-labels", "no-balancing", "larger")  # with the demo's students


def labels_arm(student: TrainConfig) -> str:
    """The generation-1 variant on the other kind of targets than the chain's."""
    return "hard-labels" if student.soft_targets else "soft-labels"


class Arm(BaseModel):
    seed: int
    arm: str
    parameters: int
    steps: int
    validation_accuracy: float
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
    robustness suites run on ``robustness_images`` test images."""
    out = os.path.abspath(out)
    rows: list[Arm] = []
    for seed in seeds:
        steps = {"teacher": teacher_steps, "student": student_steps}
        rows += _seed(os.path.join(out, f"seed-{seed}"), seed, generations, steps, robustness_images, progress)
        with open(os.path.join(out, "experiment.json"), "w") as f:  # after each seed: a partial run is readable
            json.dump([r.model_dump() for r in rows], f, indent=2)
    return rows


def _seed(
    out: str,
    seed: int,
    generations: int,
    steps: dict[str, int],
    robustness_images: int,
    progress: Callable[[str], None],
) -> list[Arm]:
    student_steps = steps["student"]

    def student_config(seed: int) -> TrainConfig:
        return demo.student_config(seed, student_steps, robustness_images)

    data = digits.write(os.path.join(out, "data"), seed=seed)
    results: dict[str, tuple[TrainResult, float, int]] = {}  # arm -> (result, seconds, steps)

    def fit(arm: str, config: TrainConfig) -> TrainResult:
        progress(f"seed {seed}: {arm} ({config.architecture} {config.model_kwargs or ''}, {config.steps} steps)")
        t = time.time()
        output = os.path.join(out, arm)
        result = pipeline.train_teacher(
            config, labeled=data["labeled"], eval=data["test"], validation=data["validation"], output=output
        )
        results[arm] = result, time.time() - t, config.steps
        return result

    teacher = fit("teacher", demo.teacher_config(seed, steps["teacher"], robustness_images))

    def generation(arm: str, teacher_uri: str, student: TrainConfig) -> pipeline.GenerationResult:
        progress(f"seed {seed}: {arm}")
        t = time.time()
        spec = demo.generation_spec(data, teacher_uri, os.path.join(out, arm), seed, student)
        result = pipeline.run_generation(spec, arm, progress=progress)
        results[arm] = result.student, time.time() - t, student.steps
        return result

    model_uri, first = teacher.model_uri, None
    for g in range(1, generations + 1):
        student = student_config(seed + g)
        made = generation(f"student-{g}", model_uri, student)
        model_uri, first = made.student.model_uri, first or made
    assert first is not None
    fit("supervised", demo.supervised_config(student))

    # Generation-1 variants: the same teacher and labels as student-1.
    gen1 = demo.generation_spec(data, teacher.model_uri, "", seed, student_config(seed + 1))
    variants = {
        "no-noise": gen1.model_copy(update={"student": gen1.student.model_copy(update={"noise": NO_NOISE})}),
        labels_arm(gen1.student): gen1.model_copy(
            update={"student": gen1.student.model_copy(update={"soft_targets": not gen1.student.soft_targets})}
        ),
        "no-balancing": gen1.model_copy(update={"curation": gen1.curation.model_copy(update={"balance": False})}),
        "larger": gen1.model_copy(update={"student": gen1.student.model_copy(update={"model_kwargs": LARGER})}),
    }
    for arm, spec in variants.items():
        progress(f"seed {seed}: {arm}")
        t = time.time()
        spec = spec.model_copy(update={"output": os.path.join(out, arm)})
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
        results[arm] = model, time.time() - t, spec.student.steps

    baseline = results["supervised"][0].metrics
    arms = []
    for arm, (result, seconds, arm_steps) in results.items():
        m = result.metrics
        relative = robustness.relative(m, baseline)
        arms.append(
            Arm(
                seed=seed,
                arm=arm,
                parameters=result.parameters,
                steps=arm_steps,
                validation_accuracy=m["validation_accuracy"],
                test_accuracy=m["test_accuracy"],
                mce=relative.get("mce"),
                mfr=relative.get("mfr"),
                flip_rate=m.get("flip_rate"),
                seconds=seconds,
            )
        )
    return arms


def table(rows: list[Arm]) -> list[dict[str, Any]]:
    """One line per arm: the mean and standard deviation over seeds of each figure, and the gain in test
    accuracy over the supervised baseline (mean of the per-seed differences)."""
    seeds = sorted({r.seed for r in rows})
    by = {(r.seed, r.arm): r for r in rows}
    order = [a for a in dict.fromkeys(r.arm for r in rows)]
    lines = []
    for arm in order:
        got = [by[(s, arm)] for s in seeds if (s, arm) in by]
        gain = [
            by[(s, arm)].test_accuracy - by[(s, "supervised")].test_accuracy
            for s in seeds
            if (s, arm) in by and (s, "supervised") in by
        ]
        lines.append(
            {
                "arm": arm,
                "seeds": len(got),
                "parameters": got[0].parameters,
                "steps": got[0].steps,
                **_stats("validation_accuracy", [r.validation_accuracy for r in got]),
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
