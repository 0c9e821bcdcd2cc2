"""Fault scenarios on a real multi-node Ray cluster on this one machine (``ray.cluster_utils.Cluster``: a head
and worker nodes, each its own raylet with its own resources), run by tests/workers/test_faults.py in a
process of their own so that their cluster never meets the test session's.

    python -m tests.faults SCENARIO WORKDIR

writes WORKDIR/result.json: what the job returned, the fault injected and when. Scenarios:

- ``label-node-loss``: head with no CPU, two 1-CPU workers; the worker hosting the teacher actor is removed
  without grace once a shard is committed, which leaves one CPU;
- ``label-actor-kill``: the same cluster; the teacher actor's process gets SIGKILL once a shard is committed;
- ``train-node-loss``: the same cluster; the node hosting the Ray Train worker is removed without grace once
  a checkpoint is written;
- ``one-cpu``: a single 1-CPU node: labeling, then training;
- ``train-stall``: a single 2-CPU node; a training worker asks for 64 CPUs, with a stall timeout of 10 s.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import ray
import ray._private.utils
from ray.cluster_utils import Cluster

from tests.helpers import checkpoint_registered, faults_temp_dir, untrained_model, write_pool
from trainer.stall import StallError

# Cluster writes its address to /tmp/ray/ray_current_cluster, where any `ray.init()` on the machine would find
# and join it: this cluster is private.
ray._private.utils.write_ray_address = lambda *args, **kwargs: None

# Enough images that a fault lands mid-job (a shard is committed a few seconds in), few enough to be quick.
IMAGES = 600
IMAGES_ONE_CPU = 100
TIMEOUT_S = 240  # a fault that never fires fails the scenario instead of waiting forever


def start(workdir: str, worker_cpus: list[int], head_cpus: int) -> tuple[Cluster, list]:
    temp_dir = faults_temp_dir(os.getpid())
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "temp_dir": temp_dir,
            "include_dashboard": False,
            "object_store_memory": 200 << 20,
        },
    )
    workers = [cluster.add_node(num_cpus=n, object_store_memory=200 << 20) for n in worker_cpus]
    cluster.wait_for_nodes()
    from service import cluster as service_cluster

    service_cluster.connect(cluster.address)
    return cluster, workers


def actors(class_fragment: str) -> list[dict]:
    """Alive actors whose class name holds ``class_fragment``, from the GCS (no dashboard needed)."""
    from ray._private.state import state

    return [
        a
        for a in state.actor_table(None).values()
        if class_fragment in a.get("ActorClassName", "") and a.get("State") == "ALIVE"
    ]


def wait_for(predicate, what: str) -> None:
    deadline = time.time() + TIMEOUT_S
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"waited {TIMEOUT_S}s for {what}")
        time.sleep(0.2)


def committed(out: str) -> bool:
    ledger = os.path.join(out, "ledger")
    return os.path.isdir(ledger) and any(n.endswith(".json") for n in os.listdir(ledger))


def alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def node_of(actor: dict, nodes: list):
    return next(n for n in nodes if n.node_id == actor["Address"]["NodeID"])


def inject(fault: dict, action) -> threading.Thread:
    """Run ``action`` in a thread; record when it ran (``at``, unless the action says), or its error."""

    def run():
        try:
            fault.update(action() or {})
            fault.setdefault("at", time.time())
        except Exception as e:  # noqa: BLE001 - recorded, and the scenario's result says the fault never fired
            fault["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def label_job(workdir: str, images: int = IMAGES, fault_action=None) -> dict:
    from workers.labeling import LabelConfig, label

    pool, model, out = (os.path.join(workdir, n) for n in ("pool", "teacher", "labels"))
    write_pool(pool, good=images - 5)
    untrained_model(model)
    fault: dict = {}
    if fault_action is not None:

        def action() -> dict:
            wait_for(lambda: committed(out), "a committed shard")
            fault["committed_at"] = time.time()
            return fault_action()

        thread = inject(fault, action)
    started = time.time()
    result = label(
        pool, model, out, LabelConfig(top_k=3, batch_size=8, shard_rows=20, rows_per_file=20, stall_timeout_s=120)
    )
    if fault_action is not None:
        thread.join(TIMEOUT_S)  # the fault may still be waiting for the GCS to notice what it did
    return {
        "labeling": result.model_dump(),
        "source_images": images,
        "fault": fault,
        "started": started,
        "finished": time.time(),
    }


def train_job(workdir: str, steps: int, fault_action=None, **config) -> dict:
    from service import pipeline
    from trainer.config import TrainConfig

    root = os.path.join(workdir, "digits")
    for c in ("0", "1"):
        write_pool(os.path.join(root, c), good=16, seed=int(c))
        for name in os.listdir(os.path.join(root, c)):  # the bad files are for labeling; here only digits
            if not name.startswith("img"):
                os.remove(os.path.join(root, c, name))
    config = TrainConfig(
        architecture="test_resnet",
        input_size=32,
        mean=(0.13,) * 3,
        std=(0.31,) * 3,
        steps=steps,
        batch_size=8,
        warmup_steps=0,
        checkpoint_every=4,
        max_failures=3,
        **config,
    )
    output = os.path.join(workdir, "train")
    fault: dict = {}
    if fault_action is not None:
        checkpoints = os.path.join(output, "checkpoints", "teacher")
        thread = inject(
            fault, lambda: (wait_for(lambda: checkpoint_registered(checkpoints), "a checkpoint"), fault_action())[1]
        )
    started = time.time()
    result = pipeline.train_teacher(config, labeled=root, eval=root, output=output)
    if fault_action is not None:
        thread.join(TIMEOUT_S)
    return {"training": result.model_dump(), "fault": fault, "started": started, "finished": time.time()}


def main(scenario: str, workdir: str) -> None:
    if scenario == "one-cpu":
        cluster, _ = start(workdir, [], head_cpus=1)
        out = label_job(workdir, IMAGES_ONE_CPU)
        out.update(train_job(workdir, steps=4))
    elif scenario == "train-stall":
        cluster, _ = start(workdir, [], head_cpus=2)
        started = time.time()
        try:
            train_job(workdir, steps=4, cpus_per_worker=64, stall_timeout_s=10)
            out = {"stall": None}
        except StallError as e:
            # The job's driver exits on the error, and the stalled run with it.
            out = {"stall": str(e), "seconds": time.time() - started}
    else:
        cluster, workers = start(workdir, [1, 1], head_cpus=0)

        def remove(class_fragment: str):
            def action() -> dict:
                wait_for(lambda: actors(class_fragment), f"an actor {class_fragment}")
                node = node_of(actors(class_fragment)[0], workers)
                cluster.remove_node(node, allow_graceful=False)
                at = time.time()
                # A job may finish before the GCS's health checks find the node dead (several seconds): the
                # cluster's resources are read only once they have.
                wait_for(lambda: not alive(node.node_id), "the GCS to mark the removed node dead")
                return {"removed_node": node.node_id, "at": at, "dead_after_s": time.time() - at}

            return action

        def kill_teacher() -> dict:
            wait_for(lambda: actors("TeacherPredictor"), "the teacher actor")
            pid = int(actors("TeacherPredictor")[0]["Pid"])
            os.kill(pid, signal.SIGKILL)
            return {"killed_pid": pid}

        if scenario == "label-node-loss":
            out = label_job(workdir, fault_action=remove("TeacherPredictor"))
        elif scenario == "label-actor-kill":
            out = label_job(workdir, fault_action=kill_teacher)
        elif scenario == "train-node-loss":
            out = train_job(workdir, steps=16, fault_action=remove("RayTrainWorker"))
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    out["cpus_left"] = ray.cluster_resources().get("CPU", 0)
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(out, f, default=str)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
