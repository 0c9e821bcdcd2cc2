"""``nstudent experiment`` on a tiny config: every arm trained, the table over seeds compares them, and a second run
on the same folder trains only what the first did not."""

import json
import os

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from service import demo, digits, experiment
from service.cli import app


def run(tmp_path, generations: int) -> tuple[str, dict[str, experiment.Arm]]:
    args = ["--out", str(tmp_path), "--seed", "3", "--generations", str(generations), "--teacher-steps", "60"]
    result = CliRunner().invoke(app, ["experiment", *args, "--student-steps", "40", "--robustness-images", "40"])
    assert result.exit_code == 0, result.output
    rows = [experiment.Arm(**r) for r in json.loads((tmp_path / "experiment.json").read_text())]
    return result.output, {r.arm: r for r in rows}


def test_experiment_runs_every_arm_and_tables_them(ray_cluster, tmp_path):
    output, arms = run(tmp_path, generations=2)
    rows = list(arms.values())
    assert set(arms) == {"student-1", "student-2", "no-noise-1", "no-noise-2", *experiment.ARMS}
    assert "reusing" not in output
    assert all(r.seed == 3 and 0.0 <= r.test_accuracy <= 1.0 and 0.0 <= r.validation_accuracy <= 1.0 for r in rows)
    assert all(r.validation_loss is not None and r.validation_loss > 0 for r in rows)
    # robustness is relative to the supervised baseline: 100 for itself, a ratio for the others
    assert arms["supervised"].mce == pytest.approx(100.0) and arms["supervised"].mfr == pytest.approx(100.0)
    assert all(r.mce is not None and r.mce > 0 for r in rows)
    # (60-step teachers and 40-step students: confident enough for some pseudo-labels over the demo's floor)
    # the baseline has the final student's architecture, steps and seed; the students more parameters than the
    # teacher, the larger student more than they
    seed_3 = tmp_path / "seed-3"
    supervised = json.loads((seed_3 / "supervised" / "model" / "model.json").read_text())
    assert supervised["config"]["seed"] == 3 + 2
    assert arms["supervised"].parameters == arms["student-2"].parameters
    assert arms["supervised"].steps == arms["student-2"].steps == 40
    assert arms["larger"].parameters > arms["student-1"].parameters > arms["teacher"].parameters
    # the robustness suites ran on the 40 test images asked for
    assert supervised["metrics"]["robustness_images"] == 40
    # the ceiling: the baseline's config on the labeled split and the pool, every image with its true label
    ceiling = json.loads((seed_3 / "true-labels" / "model" / "model.json").read_text())
    assert ceiling["config"] == supervised["config"]
    # the baseline's second draw: its config but the next training seed
    redraw = json.loads((seed_3 / "supervised-redraw" / "model" / "model.json").read_text())
    assert redraw["config"] == {**supervised["config"], "seed": 3 + 2 + 1}
    truth = pq.read_table(seed_3 / "data" / "true_labels.parquet").to_pylist()
    assert len(truth) == 100 + 3800
    for row in truth:  # each image under the folder of its class, or in the pool with that label in the truth file
        if "/labeled/" in row["uri"]:
            assert row["uri"].split("/")[-2] == row["label"]
    pool = {r["uri"]: r["label"] for r in truth if "/unlabeled/" in r["uri"]}
    _, y = digits.load()
    assert len(pool) == 3800 and all(
        digits.CLASSES[y[int(os.path.basename(u)[:-4])]] == label for u, label in pool.items()
    )

    # the no-noise chain: each student without noise, the second taught by the first
    assert json.loads((seed_3 / "no-noise-2" / "generation.json").read_text())["teacher_uri"] == str(
        seed_3 / "no-noise-1" / "model"
    )
    for g in (1, 2):
        noise = json.loads((seed_3 / f"no-noise-{g}" / "model" / "model.json").read_text())["config"]["noise"]
        assert noise["dropout"] == noise["drop_path"] == noise["erase_prob"] == noise["randaugment_ops"] == 0

    lines = {line["arm"]: line for line in json.loads((tmp_path / "table.json").read_text())}
    # gains are over the mean of the baseline's two draws
    baseline = (arms["supervised"].test_accuracy + arms["supervised-redraw"].test_accuracy) / 2
    assert lines["student-2"]["gain_over_supervised"] == pytest.approx(arms["student-2"].test_accuracy - baseline)
    assert lines["supervised"]["gain_over_supervised"] == pytest.approx(
        -lines["supervised-redraw"]["gain_over_supervised"]
    )
    assert lines["teacher"]["seeds"] == 1
    assert "supervised-redraw" in output and "no-noise-2" in output

    # Run again: every arm is read back, none trained, and the table is the same.
    output, again = run(tmp_path, generations=2)
    assert all(f"{arm}: reusing" in output for arm in arms)
    assert again == arms

    # An arm is trained again, from a clear folder, when its config changed or a model upstream was trained again.
    said: list[str] = []
    seed_arms = experiment._Arms(str(seed_3), {}, said.append)
    config = demo.student_config(3 + 2, steps=40, robustness_images=40)
    assert seed_arms.finished("student-2", config, after=("student-1",)) is not None
    assert seed_arms.finished("student-2", config.model_copy(update={"steps": 41}), after=("student-1",)) is None
    assert not (seed_3 / "student-2").exists()
    quiet = config.model_copy(update={"noise": experiment.NO_NOISE})
    assert seed_arms.finished("no-noise-2", quiet, after=("no-noise-1",)) is not None
    seed_arms.trained.add("no-noise-1")
    assert seed_arms.finished("no-noise-2", quiet, after=("no-noise-1",)) is None
    assert not (seed_3 / "no-noise-2").exists() and (seed_3 / "no-noise-1" / "model").exists()
    assert [line.split(":")[0] for line in said] == ["student-2", "no-noise-2"]


def test_table_gains_are_over_the_mean_of_the_baseline_draws():
    def arm(seed, name, test):
        return experiment.Arm(
            seed=seed, arm=name, parameters=1, steps=1, validation_accuracy=0.9, test_accuracy=test,
            mce=None, mfr=None, flip_rate=None, seconds=1.0,
        )  # fmt: skip

    rows = [
        arm(0, "student-1", 0.97), arm(0, "supervised", 0.94), arm(0, "supervised-redraw", 0.96),
        arm(1, "student-1", 0.98), arm(1, "supervised", 0.95), arm(1, "supervised-redraw", 0.95),
    ]  # fmt: skip
    lines = {line["arm"]: line for line in experiment.table(rows)}
    assert lines["student-1"]["gain_over_supervised"] == pytest.approx(0.025)  # (0.02 + 0.03) / 2
    assert lines["student-1"]["gain_over_supervised_sd"] == pytest.approx(0.00707107, rel=1e-4)
    assert lines["supervised"]["gain_over_supervised"] == pytest.approx(-0.005)
    assert lines["supervised-redraw"]["gain_over_supervised"] == pytest.approx(0.005)
    assert lines["student-1"]["test_accuracy"] == pytest.approx(0.975) and lines["student-1"]["seeds"] == 2
