"""``nstudent experiment`` on a tiny config: every arm trained, and the table over seeds compares them."""

import json

import pytest
from typer.testing import CliRunner

from service import experiment
from service.cli import app


def test_experiment_runs_every_arm_and_tables_them(ray_cluster, tmp_path):
    args = ["--out", str(tmp_path), "--seed", "3", "--generations", "1", "--teacher-steps", "60"]
    result = CliRunner().invoke(app, ["experiment", *args, "--student-steps", "4", "--robustness-images", "40"])
    assert result.exit_code == 0, result.output

    rows = [experiment.Arm(**r) for r in json.loads((tmp_path / "experiment.json").read_text())]
    arms = {r.arm: r for r in rows}
    assert set(arms) == {"teacher", "student-1", *experiment.ARMS}
    assert all(r.seed == 3 and 0.0 <= r.test_accuracy <= 1.0 and 0.0 <= r.validation_accuracy <= 1.0 for r in rows)
    # robustness is relative to the supervised baseline: 100 for itself, a ratio for the others
    assert arms["supervised"].mce == pytest.approx(100.0) and arms["supervised"].mfr == pytest.approx(100.0)
    assert all(r.mce is not None and r.mce > 0 for r in rows)
    # (a 60-step teacher: confident enough for some pseudo-labels over the demo's floor)
    # the baseline has the final student's architecture and steps; the larger student more parameters
    assert arms["supervised"].parameters == arms["student-1"].parameters
    assert arms["supervised"].steps == arms["student-1"].steps == 4
    assert arms["larger"].parameters > arms["student-1"].parameters

    # the robustness suites ran on the 40 test images asked for
    supervised = json.loads((tmp_path / "seed-3" / "supervised" / "model" / "model.json").read_text())
    assert supervised["metrics"]["robustness_images"] == 40

    lines = {line["arm"]: line for line in json.loads((tmp_path / "table.json").read_text())}
    assert lines["student-1"]["gain_over_supervised"] == pytest.approx(
        arms["student-1"].test_accuracy - arms["supervised"].test_accuracy
    )
    assert lines["supervised"]["gain_over_supervised"] == 0.0 and lines["teacher"]["seeds"] == 1
    assert "test - supervised" in result.output and "no-balancing" in result.output
