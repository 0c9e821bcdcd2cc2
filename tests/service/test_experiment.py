"""``nstudent experiment`` on a tiny config: every arm trained, the table over seeds compares them, and a second run
on the same folder trains only what the first did not."""

import json

import pytest
from typer.testing import CliRunner

from service import experiment
from service.cli import app


def run(tmp_path, generations: int) -> tuple[str, dict[str, experiment.Arm]]:
    args = ["--out", str(tmp_path), "--seed", "3", "--generations", str(generations), "--teacher-steps", "60"]
    result = CliRunner().invoke(app, ["experiment", *args, "--student-steps", "40", "--robustness-images", "40"])
    assert result.exit_code == 0, result.output
    rows = [experiment.Arm(**r) for r in json.loads((tmp_path / "experiment.json").read_text())]
    return result.output, {r.arm: r for r in rows}


def test_experiment_runs_every_arm_and_tables_them(ray_cluster, tmp_path):
    output, arms = run(tmp_path, generations=1)
    rows = list(arms.values())
    assert set(arms) == {"student-1", "no-noise-1", *experiment.ARMS}
    assert "reusing" not in output
    assert all(r.seed == 3 and 0.0 <= r.test_accuracy <= 1.0 and 0.0 <= r.validation_accuracy <= 1.0 for r in rows)
    # robustness is relative to the supervised baseline: 100 for itself, a ratio for the others
    assert arms["supervised"].mce == pytest.approx(100.0) and arms["supervised"].mfr == pytest.approx(100.0)
    assert all(r.mce is not None and r.mce > 0 for r in rows)
    # (60-step teachers and 40-step students: confident enough for some pseudo-labels over the demo's floor)
    # the baseline has the final student's architecture and steps; the larger student more parameters
    assert arms["supervised"].parameters == arms["student-1"].parameters
    assert arms["supervised"].steps == arms["student-1"].steps == 40
    assert arms["larger"].parameters > arms["student-1"].parameters

    # the robustness suites ran on the 40 test images asked for
    supervised = json.loads((tmp_path / "seed-3" / "supervised" / "model" / "model.json").read_text())
    assert supervised["metrics"]["robustness_images"] == 40

    lines = {line["arm"]: line for line in json.loads((tmp_path / "table.json").read_text())}
    assert lines["student-1"]["gain_over_supervised"] == pytest.approx(
        arms["student-1"].test_accuracy - arms["supervised"].test_accuracy
    )
    assert lines["supervised"]["gain_over_supervised"] == 0.0 and lines["teacher"]["seeds"] == 1
    assert "test - supervised" in output and "no-balancing" in output

    # A second generation on the same folder: the arms that do not depend on it are read back, the rest trained.
    output, again = run(tmp_path, generations=2)
    assert set(again) == {"student-1", "student-2", "no-noise-1", "no-noise-2", *experiment.ARMS}
    reused = {"teacher", "student-1", "no-noise-1", "soft-labels", "no-balancing", "larger"}
    for arm in reused:
        assert f"{arm}: reusing" in output
        same = ("test_accuracy", "validation_accuracy", "parameters", "steps", "flip_rate", "seconds")
        assert {k: getattr(again[arm], k) for k in same} == {k: getattr(arms[arm], k) for k in same}
    # the baseline follows the final student (a new seed), so it is trained again, not resumed from its old run
    assert "supervised: reusing" not in output
    assert "student-2: reusing" not in output and "no-noise-2: reusing" not in output
    no_noise_2 = json.loads((tmp_path / "seed-3" / "no-noise-2" / "generation.json").read_text())
    assert no_noise_2["teacher_uri"] == str(tmp_path / "seed-3" / "no-noise-1" / "model")
    quiet = json.loads((tmp_path / "seed-3" / "no-noise-2" / "model" / "model.json").read_text())["config"]["noise"]
    assert quiet["dropout"] == quiet["drop_path"] == quiet["erase_prob"] == quiet["randaugment_ops"] == 0
    baseline = json.loads((tmp_path / "seed-3" / "supervised" / "model" / "model.json").read_text())["config"]
    assert baseline["seed"] == 3 + 2 and again["supervised"].steps == 40
