"""What a real cluster does to a generation: a node lost without grace, the teacher's process killed, a
cluster of one CPU, a job that cannot progress. The multi-node scenarios run on a head and two worker nodes
(``ray.cluster_utils.Cluster``) in a process of their own (``tests/faults.py``); each must finish with every
source image exactly once in the predictions or the rejects, or resume training from its last checkpoint."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest

from curation import sources, storage
from tests.helpers import faults_temp_dir, kill_process_tree, untrained_model, write_pool
from workers import ledger
from workers.labeling import LabelConfig, label
from workers.watchdog import StallError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_scenario(scenario: str, workdir: str, timeout: float = 600) -> dict:
    """Run a scenario of tests/faults.py in its own process group; kill what is left of it in any case."""
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.faults", scenario, workdir],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    temp_dir = faults_temp_dir(proc.pid)
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        kill_process_tree(proc, os.path.basename(temp_dir))
    assert proc.returncode == 0, output.decode(errors="replace")[-4000:]
    shutil.rmtree(temp_dir, ignore_errors=True)  # its cluster's logs: kept when it failed
    with open(os.path.join(workdir, "result.json")) as f:
        return json.load(f)


def labeled_ids(out: str) -> Counter:
    ids: Counter = Counter()
    for part in (ledger.PREDICTIONS, ledger.REJECTS):
        for uri in storage.list_files(storage.join(out, part), suffix=".parquet"):
            ids.update(pq.read_table(uri, columns=["image_id"]).column("image_id").to_pylist())
    return ids


def source_ids(pool: str) -> Counter:
    return Counter(sources.image_id(os.path.join(pool, n)) for n in os.listdir(pool))


def assert_labeled_exactly_once(workdir: str, result: dict) -> None:
    pool = os.path.join(workdir, "pool")
    assert labeled_ids(os.path.join(workdir, "labels")) == source_ids(pool)
    labeling = result["labeling"]
    assert labeling["images"] == result["source_images"] and labeling["predicted"] == result["source_images"] - 5
    assert labeling["rejected"] == {"corrupt": 3, "empty": 1, "not_an_image": 1}


@pytest.mark.slow
def test_labeling_survives_losing_the_teacher_s_node(tmp_path):
    """The worker node that hosts the teacher actor is removed without grace after a shard is committed:
    the job goes on with the one CPU left and labels every image exactly once."""
    result = run_scenario("label-node-loss", str(tmp_path))
    fault = result["fault"]
    assert "removed_node" in fault, fault
    assert result["started"] < fault["at"] < result["finished"]
    assert result["cpus_left"] == 1
    assert_labeled_exactly_once(str(tmp_path), result)


@pytest.mark.slow
def test_labeling_survives_sigkill_of_the_teacher_actor(tmp_path):
    result = run_scenario("label-actor-kill", str(tmp_path))
    fault = result["fault"]
    assert "killed_pid" in fault, fault
    assert result["started"] < fault["at"] < result["finished"]
    assert_labeled_exactly_once(str(tmp_path), result)


@pytest.mark.slow
def test_training_survives_losing_its_worker_s_node(tmp_path):
    """The node of the Ray Train worker is removed without grace after a checkpoint: the worker group
    restarts on the other node from that checkpoint, and the model records the step it resumed from."""
    result = run_scenario("train-node-loss", str(tmp_path))
    fault = result["fault"]
    assert "removed_node" in fault, fault
    assert result["started"] < fault["at"] < result["finished"]
    metrics = result["training"]["metrics"]
    assert metrics["resumed_from_step"] > 0 and metrics["resumed_from_step"] % 4 == 0
    with open(tmp_path / "train" / "model" / "model.json") as f:
        assert json.load(f)["metrics"]["resumed_from_step"] == metrics["resumed_from_step"]
    assert result["cpus_left"] == 1


@pytest.mark.slow
def test_one_cpu_is_enough_to_label_and_train(tmp_path):
    result = run_scenario("one-cpu", str(tmp_path))
    assert_labeled_exactly_once(str(tmp_path), result)
    assert result["training"]["metrics"]["test_images"] == 32
    assert result["cpus_left"] == 1


def test_a_job_that_cannot_progress_fails_naming_what_it_waits_for(ray_cluster, tmp_path):
    """A teacher actor asking for more CPUs than the cluster has would wait forever: with a stall timeout of
    a few seconds the job fails, and the error names the actor, what it needs and what the cluster has."""
    write_pool(str(tmp_path / "pool"), good=20)
    untrained_model(str(tmp_path / "teacher"))
    config = LabelConfig(top_k=3, batch_size=8, cpus_per_actor=64, stall_timeout_s=3)
    with pytest.raises(StallError) as e:
        label(str(tmp_path / "pool"), str(tmp_path / "teacher"), str(tmp_path / "labels"), config)
    message = str(e.value)
    assert "labeling made no progress for" in message
    assert (
        "actor MapBatches(TeacherPredictor): 0 running, 1 pending; each needs {CPU: 64}, cluster has {CPU: " in message
    )
    assert "available of 2}" in message
    assert "waiting for resources (tasks/actors): {CPU: 64} x 1" in message


def test_a_training_run_that_cannot_start_fails_naming_what_it_waits_for(tmp_path):
    """A worker asking for more CPUs than the cluster has would wait for ever in Ray Train: with a stall timeout
    of 10 s the job's driver fails with an error naming the worker group's demand and what the cluster has."""
    result = run_scenario("train-stall", str(tmp_path))
    message = result["stall"]
    assert "training made no progress for" in message and "last seen: no step yet" in message
    assert "worker group: 1 worker(s), each needs {CPU: 64}, cluster has {CPU: 2 available of 2}" in message
    assert "waiting for resources (placement group): {CPU: 64} x 1" in message
    assert 10 <= result["seconds"] < 60
    assert not os.path.exists(os.path.join(str(tmp_path), "train", "model"))
