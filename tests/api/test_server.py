"""The control plane for real: `nstudent serve` as a process, its own local Ray head, Ray jobs on the digits.

One generation trains a teacher, labels the pool, curates and fits a student; a second one, taught by the
first, is interrupted by SIGKILL of the server and finishes after a restart, each of its jobs run once.
"""

import json
import time
from pathlib import Path

import httpx
import pyarrow.dataset as pads
import pytest
from ray.job_submission import JobSubmissionClient

from curation.balance import NUM_BINS
from service import cluster
from tests.api.conftest import running_server, train
from tests.helpers import checkpoint_registered

pytestmark = pytest.mark.slow
WRITE, READ = {"Authorization": "Bearer w-token"}, {"Authorization": "Bearer r-token"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, digits_root):
    with running_server(
        tmp_path_factory.mktemp("serve"), digits_root, NSTUDENT_MAX_RUNNING_JOBS="1", NSTUDENT_RETRY_BACKOFF_SECONDS="1"
    ) as s:
        yield s


def sources(digits_root, **kw) -> dict:
    """A generation's sources. The later tests are taught by the first generation's 20-step student, whose
    confidence is no subject here: they keep every label."""
    return {
        "labeled": str(digits_root / "labeled"),
        "unlabeled": str(digits_root / "unlabeled"),
        "eval": str(digits_root / "test"),
        "curation": {"confidence_floor": 0.0},
        **kw,
    }


def ray_jobs(server, generation_id) -> dict:
    """The Ray jobs of a generation, by submission id, as the head the server started knows them."""
    head = cluster.Head(**json.loads((server.data_dir / "ray" / "head.json").read_text()))
    client = JobSubmissionClient(head.dashboard_url, headers={"Authorization": f"Bearer {head.token}"})
    return {j.submission_id: j for j in client.list_jobs() if j.submission_id.startswith(generation_id)}


def wait(server, generation_id, until, timeout=900):
    """Poll until ``until(generation)``; a generation that fails or is cancelled on the way fails the test."""
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        g = httpx.get(f"{server.url}/generations/{generation_id}", headers=READ, timeout=10).json()
        if not seen or seen[-1] != g["stage"]:
            seen.append(g["stage"])
        if until(g):
            return g, seen
        assert g["stage"] != "failed" and (g["stage"] != "cancelled" or g["cancel_requested"]), g["error"]
        time.sleep(0.5)
    raise TimeoutError(f"{generation_id}: stages {seen}\n{server.log()[-3000:]}")


def test_a_generation_end_to_end(server, digits_root):
    body = sources(digits_root, teacher_config=train(30), student=train(20), curation={"confidence_floor": 0.15})
    r = httpx.post(f"{server.url}/generations", json=body, headers=WRITE, timeout=30)
    assert r.status_code == 202, r.text
    gid = r.json()["id"]
    g, stages = wait(server, gid, lambda g: g["stage"] == "succeeded")
    assert stages[0] in ("queued", "training_teacher") and stages[-1] == "succeeded"
    assert [s for s in ("training_teacher", "labeling", "training") if s in stages] == [
        "training_teacher",
        "labeling",
        "training",
    ]
    assert set(g["jobs"]) == {"teacher", "label", "train"} and set(g["timings"]) >= {
        "training_teacher",
        "labeling",
        "training",
    }
    assert all(t["seconds"] > 0 for t in g["timings"].values())
    assert 0 < g["metrics"]["test_accuracy"] <= 1 and g["metrics"]["test_images"] == 100
    assert g["progress"]["step"] == g["progress"]["steps"] == 20 or g["progress"] == {}

    # The curation statistics match the manifest on disk.
    d = httpx.get(f"{server.url}{g['links']['dataset']}", headers=READ, timeout=10).json()
    manifest = pads.dataset(d["manifest_uri"], format="parquet").to_table()
    assert d["manifest_rows"] == manifest.num_rows > 0
    assert d["manifest_copies"] == sum(manifest.column("copies").to_pylist())
    assert d["images_seen"] == 5000 - 150 and d["images_decoded"] == d["images_seen"] and d["rejected"] == {}
    assert len(d["confidence_histogram"]) == NUM_BINS and sum(d["confidence_histogram"]) == d["images_decoded"]
    labels = manifest.column("label").to_pylist()
    for c in d["classes"]:
        assert c["kept"] == labels.count(c["class_index"])
        assert c["threshold"] >= d["config"]["confidence_floor"]
    # ... and the manifest pages are that manifest, in order.
    page = httpx.get(f"{server.url}/datasets/{d['dataset_id']}/manifest?offset=0&limit=1000", headers=READ).json()
    assert page["count"] == manifest.num_rows
    ids = {r["image_id"] for r in page["data"]}
    rest = httpx.get(f"{server.url}/datasets/{d['dataset_id']}/manifest?offset=1000&limit=1000", headers=READ).json()
    assert len(page["data"]) == min(1000, manifest.num_rows) and not ids & {r["image_id"] for r in rest["data"]}
    assert ids <= set(manifest.column("image_id").to_pylist())

    model = httpx.get(f"{server.url}/generations/{gid}/model", headers=READ).json()
    assert (
        model["uri"] == g["model_uri"]
        and model["metrics"] == g["metrics"]
        and model["class_names"] == list("0123456789")
    )
    server.first_generation = gid


def test_a_restart_in_the_middle_finishes_the_generation_once(server, digits_root):
    gid = getattr(server, "first_generation", None)
    if gid is None:
        pytest.skip("needs the first generation's model")
    body = sources(digits_root, teacher=gid, student=train(40))
    r = httpx.post(f"{server.url}/generations", json=body, headers={**WRITE, "Idempotency-Key": "restart-test"})
    second = r.json()["id"]
    wait(server, second, lambda g: g["stage"] in ("training", "evaluating") and g["progress"].get("step"))
    server.kill()
    killed_at = time.time()
    server.start()
    # A client retrying its POST after the restart gets the same generation back.
    again = httpx.post(f"{server.url}/generations", json=body, headers={**WRITE, "Idempotency-Key": "restart-test"})
    assert again.status_code == 202 and again.json()["id"] == second
    g, _ = wait(server, second, lambda g: g["stage"] == "succeeded")
    assert g["parent_id"] == gid and g["teacher_uri"].endswith(f"{gid}/model")
    # The same unlabeled folder is not listed again: the labeling job read the first generation's listing.
    assert g["spec"]["unlabeled"] == str(digits_root / "unlabeled")
    assert json.loads(Path(g["output"], "spec.json").read_text())["unlabeled"].endswith(f"{gid}/labels/source.parquet")

    mine = list(ray_jobs(server, second).values())
    assert sorted(j.submission_id for j in mine) == [f"{second}-label-1", f"{second}-train-1"]
    assert all(j.status.value == "SUCCEEDED" for j in mine)
    # Neither job was started again after the restart: both began before the kill.
    assert all(j.start_time / 1000 < killed_at for j in mine)
    # The student ran straight through: no resume from a checkpoint.
    assert g["metrics"]["resumed_from_step"] == 0


def test_cancel_stops_the_running_job(server, digits_root):
    gid = getattr(server, "first_generation", None)
    if gid is None:
        pytest.skip("needs the first generation's model")
    body = sources(digits_root, teacher=gid, student=train(400))
    third = httpx.post(f"{server.url}/generations", json=body, headers=WRITE).json()["id"]
    wait(server, third, lambda g: g["stage"] in ("labeling", "curating", "training"))
    r = httpx.post(f"{server.url}/generations/{third}/cancel", headers=WRITE)
    assert r.status_code == 202 and r.json()["cancel_requested"]
    g, _ = wait(server, third, lambda g: g["stage"] == "cancelled", timeout=300)
    assert g["error"] == "cancelled on request" and g["model_uri"] is None
    statuses = {sid: j.status.value for sid, j in ray_jobs(server, third).items()}
    assert "STOPPED" in statuses.values() and not {"PENDING", "RUNNING"} & set(statuses.values()), statuses


def _small_pool(digits_root, images: int) -> str:
    """A manifest of ``images`` unlabeled digits spread over the whole pool (whose names follow the class),
    inside the source root."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    every = sorted(str(p) for p in (digits_root / "unlabeled").rglob("*.png"))
    uris = every[:: len(every) // images][:images]
    path = digits_root / f"pool-{images}.parquet"
    pq.write_table(pa.table({"uri": uris}), path)
    return str(path)


def _kill_driver(submission_id: str) -> bool:
    """SIGKILL the process running a job's entry point, as the OOM killer or a lost pod would."""
    import os
    import signal

    for p in Path("/proc").glob("[0-9]*/cmdline"):
        argv = _read(p).split(b"\0")
        if b"--attempt-id" in argv and submission_id.encode() in argv and any(a.endswith(b"nstudent") for a in argv):
            os.kill(int(p.parent.name), signal.SIGKILL)
            return True
    return False


def test_admission_a_killed_job_and_a_retry(server, digits_root):
    """Three small chains with at most one job running at a time: all finish. The train job of the first is
    SIGKILLed and retried by the control plane; the second is cancelled, then retried by a user."""
    gid = getattr(server, "first_generation", None)
    if gid is None:
        pytest.skip("needs the first generation's model")
    pool = _small_pool(digits_root, 150)
    body = sources(digits_root, teacher=gid, unlabeled=pool, student=train(40))
    ids = [httpx.post(f"{server.url}/generations", json=body, headers=WRITE).json()["id"] for _ in range(3)]
    most_active, killed, cancelled, deadline = 0, False, False, time.time() + 900
    while time.time() < deadline:
        jobs = [j for g in ids for j in ray_jobs(server, g).values()]
        most_active = max(most_active, sum(j.status.value in ("PENDING", "RUNNING") for j in jobs))
        gens = {g: httpx.get(f"{server.url}/generations/{g}", headers=READ).json() for g in ids}
        first, second = gens[ids[0]], gens[ids[1]]
        student_run = Path(first["output"]) / "checkpoints" / "student"
        if not killed and first["stage"] == "training" and checkpoint_registered(str(student_run)):
            killed = _kill_driver(first["jobs"]["train"][-1]["id"])
        if not cancelled and second["stage"] in ("labeling", "curating", "training"):
            assert httpx.post(f"{server.url}/generations/{ids[1]}/cancel", headers=WRITE).status_code == 202
            cancelled = True
        if cancelled and second["stage"] == "cancelled":
            r = httpx.post(f"{server.url}/generations/{ids[1]}/retry", headers=WRITE)
            assert r.status_code == 202 and r.json()["retries"] == 1
        if all(g["stage"] == "succeeded" for g in gens.values()):
            break
        assert not {"failed"} & {g["stage"] for g in gens.values()}, [g["error"] for g in gens.values()]
        time.sleep(0.5)
    assert all(g["stage"] == "succeeded" for g in gens.values()), gens
    assert most_active == 1 and killed and cancelled
    # The killed attempt failed for a cause of the cluster's, and the next one finished from its checkpoint.
    train_attempts = gens[ids[0]]["jobs"]["train"]
    assert [a["status"] for a in train_attempts] == ["FAILED", "SUCCEEDED"] and train_attempts[0]["cause"] == "infra"
    assert gens[ids[0]]["metrics"]["resumed_from_step"] >= 10
    # The cancelled generation went on in the same folder, from where it was stopped.
    retried = gens[ids[1]]
    assert retried["retries"] == 1 and retried["output"].endswith(ids[1])
    stopped = [a for attempts in retried["jobs"].values() for a in attempts if a["status"] == "STOPPED"]
    assert len(stopped) == 1 and all(attempts[-1]["status"] == "SUCCEEDED" for attempts in retried["jobs"].values())


def test_a_clean_stop_stops_the_local_head_and_its_jobs(server, digits_root):
    gid = getattr(server, "first_generation", None)
    if gid is None:
        pytest.skip("needs the first generation's model")
    body = sources(digits_root, teacher=gid, student=train(400))
    running = httpx.post(f"{server.url}/generations", json=body, headers=WRITE).json()["id"]
    wait(server, running, lambda g: g["stage"] in ("labeling", "curating", "training"))
    head = cluster.Head(**json.loads((server.data_dir / "ray" / "head.json").read_text()))
    server.stop()  # SIGTERM
    assert server.proc.returncode is not None and not cluster._alive(head.pid)
    # in Ray's order: the raylet, then the GCS, each on SIGTERM, before the rest is killed
    assert "did not exit within" not in server.log()
    leftovers = [
        p
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if p.exists() and (running.encode() in _read(p) or head.temp_dir.encode() in _read(p))
    ]
    assert leftovers == [], [_read(p) for p in leftovers]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended while we looked
        return b""
