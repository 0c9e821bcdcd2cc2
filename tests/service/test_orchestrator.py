"""The orchestrator's state machine, tick by tick, against a real store and a Jobs API that the test drives.

Every transition, cancellation, restart reconciliation, retries of failed attempts, user retries and admission
control; no Ray: ``FakeJobs`` keeps job statuses in a dict and the test decides how each job ends.
"""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest

from curation import storage
from curation.layout import ErrorKind, JobError, Layout, Phase, write_progress
from service.control import ControlPlane
from service.errors import Conflict, InvalidRequest
from service.jobs import JobState, RayUnavailable
from service.orchestrator import Orchestrator
from service.principals import DEFAULT, Principal, Principals, Role
from service.settings import Settings
from service.states import TRANSITIONS, IllegalTransition, JobKind, JobStatus, Stage, check_transition
from service.store import Store

CLASSES = [str(c) for c in range(3)]


class FakeJobs:
    """The Jobs API's surface, in memory: ``finish`` ends a job as a test wants."""

    def __init__(self):
        self.status: dict[str, JobStatus] = {}
        self.submitted: list[str] = []
        self.args: dict[str, list[str]] = {}
        self.stopped: list[str] = []
        self.down = False

    def ping(self) -> None:
        if self.down:
            raise RayUnavailable("Ray Jobs API at http://127.0.0.1:9: connection refused")

    def submit(self, submission_id: str, args: list[str], *, env=None) -> None:
        self.ping()
        if submission_id in self.status:
            return
        self.status[submission_id] = JobStatus.PENDING
        self.submitted.append(submission_id)
        self.args[submission_id] = args

    def state(self, submission_id: str) -> JobState:
        self.ping()
        return JobState(self.status.get(submission_id, JobStatus.MISSING))

    def failure(self, submission_id: str) -> str:
        return "ray.exceptions.NodeDiedError: the node running the driver died"

    def stop(self, submission_id: str) -> None:
        self.stopped.append(submission_id)
        self.status[submission_id] = JobStatus.STOPPED

    def running(self) -> list[str]:
        return [sid for sid, s in self.status.items() if s.active]


class World:
    """A control plane on SQLite with FakeJobs; ``finish`` plays a job's end, writing what the real job writes."""

    def __init__(self, tmp_path, **settings):
        self.sources = tmp_path / "sources"
        for split in ("labeled", "eval"):
            for c in CLASSES:
                (self.sources / split / c).mkdir(parents=True)
                (self.sources / split / c / "a.png").write_bytes(b"\x89PNG")
        (self.sources / "unlabeled").mkdir()
        (self.sources / "unlabeled" / "x.png").write_bytes(b"\x89PNG")
        self.settings = Settings(
            data_dir=tmp_path / "data", source_roots=[str(self.sources)], retry_backoff_seconds=0, **settings
        )
        self.store = Store(self.settings.database)
        self.store.migrate()
        self.jobs = FakeJobs()
        self.control = ControlPlane(self.settings, self.store, self.jobs, Principals())
        self.me = Principal(DEFAULT, Role.WRITE)
        self.orchestrator: Orchestrator = self.control.orchestrator

    def post(self, iterations: int = 1, **fields):
        from service.specs import GenerationConfig

        body = {
            "labeled": str(self.sources / "labeled"),
            "unlabeled": str(self.sources / "unlabeled"),
            "eval": str(self.sources / "eval"),
            "student": {"architecture": "test_resnet"},
            **fields,
        }
        return [g.id for g in self.control.create(GenerationConfig.model_validate(body), iterations, None, self.me)]

    def get(self, gid: str):
        return self.store.get(gid)

    def tick(self, times: int = 1) -> None:
        for _ in range(times):
            self.orchestrator.tick()

    def attempt(self, gid: str, kind: JobKind, n: int = -1):
        return self.get(gid).attempts_of(kind)[n]

    def finish(
        self, gid: str, kind: JobKind, status: JobStatus = JobStatus.SUCCEEDED, error: JobError | None = None
    ) -> str:
        g = self.get(gid)
        sid = g.attempts_of(kind)[-1].id
        layout = Layout(g.output)
        if status == JobStatus.SUCCEEDED and kind == JobKind.TEACHER:
            _model(layout.teacher_model, accuracy=0.5)
        if status == JobStatus.SUCCEEDED and kind == JobKind.LABEL:
            _stats(layout, "d-" + gid.removeprefix("g-"))
        if status == JobStatus.SUCCEEDED and kind == JobKind.TRAIN:
            _model(layout.model, accuracy=0.9)
        if error is not None:
            storage.write_json(layout.error(sid), error.model_dump(mode="json"))
        self.jobs.status[sid] = status
        return sid


def _model(uri: str, accuracy: float) -> None:
    os.makedirs(uri, exist_ok=True)
    meta = {
        "architecture": "test_resnet",
        "class_names": CLASSES,
        "input_size": 32,
        "mean": [0.1] * 3,
        "std": [0.3] * 3,
        "metrics": {"test_accuracy": accuracy},
    }
    with open(os.path.join(uri, "model.json"), "w") as f:
        json.dump(meta, f)


def _stats(layout: Layout, dataset_id: str) -> None:
    stats = {
        "dataset_id": dataset_id,
        "images_seen": 1,
        "images_decoded": 1,
        "rejected": {},
        "images_per_class": 1,
        "classes": [],
        "confidence_histogram": [0] * 100,
        "config": {},
        "config_hash": "h",
        "manifest_uri": storage.join(layout.dataset, "manifest"),
        "manifest_rows": 1,
        "manifest_copies": 1,
        "manifest_checksum": "c",
        "predictions_uri": storage.join(layout.labels, "predictions"),
    }
    storage.write_json(layout.stats, stats)


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.store.close()


def test_the_transition_table_is_closed_and_ends_only_by_retry():
    assert set(TRANSITIONS) == set(Stage)
    assert TRANSITIONS[Stage.SUCCEEDED] == frozenset()
    for stage in (Stage.FAILED, Stage.CANCELLED):
        assert TRANSITIONS[stage] == {Stage.QUEUED}
    for stage in Stage:
        if not stage.finished:
            assert {Stage.FAILED, Stage.CANCELLED} <= TRANSITIONS[stage], stage
    with pytest.raises(IllegalTransition, match="from succeeded to queued"):
        check_transition(Stage.SUCCEEDED, Stage.QUEUED)
    check_transition(Stage.LABELING, Stage.LABELING)  # staying put is no move


def test_a_generation_goes_through_every_stage(world):
    [gid] = world.post()
    world.tick()
    g = world.get(gid)
    assert g.state == Stage.TRAINING_TEACHER and world.jobs.submitted == [f"{gid}-teacher-1"]
    assert world.jobs.args[f"{gid}-teacher-1"][-2:] == ["--attempt-id", f"{gid}-teacher-1"]
    assert world.attempt(gid, JobKind.TEACHER).submitted
    json.loads(open(Layout(g.output).spec).read())  # the spec the jobs read is written first

    world.jobs.status[f"{gid}-teacher-1"] = JobStatus.RUNNING
    write_progress(Layout(g.output).progress, Phase.TRAINING, step=3, steps=10)
    world.tick()
    g = world.get(gid)
    assert g.progress == {"phase": "training", "step": 3, "steps": 10}
    assert world.attempt(gid, JobKind.TEACHER).status == JobStatus.RUNNING

    world.finish(gid, JobKind.TEACHER)
    world.tick()
    assert world.get(gid).state == Stage.LABELING and world.jobs.submitted[-1] == f"{gid}-label-1"
    assert world.get(gid).progress == {}  # the teacher's progress is gone with its job

    world.jobs.status[f"{gid}-label-1"] = JobStatus.RUNNING
    write_progress(Layout(g.output).progress, Phase.CURATING)
    world.tick()
    assert world.get(gid).state == Stage.CURATING

    world.finish(gid, JobKind.LABEL)
    world.tick()
    g = world.get(gid)
    assert g.state == Stage.TRAINING and g.dataset_id == "d-" + gid.removeprefix("g-")
    assert world.store.dataset(g.dataset_id).rows == 1

    world.jobs.status[f"{gid}-train-1"] = JobStatus.RUNNING
    write_progress(Layout(g.output).progress, Phase.EVALUATING, step=10, steps=10)
    world.tick()
    assert world.get(gid).state == Stage.EVALUATING

    world.finish(gid, JobKind.TRAIN)
    world.tick()
    g = world.get(gid)
    assert g.state == Stage.SUCCEEDED and g.metrics == {"test_accuracy": 0.9} and g.model_uri == Layout(g.output).model
    assert [k for k in g.timings] == ["training_teacher", "labeling", "curating", "training", "evaluating"]
    assert all("finished" in t for t in g.timings.values())
    assert g.attempts == 3 and {k: len(v) for k, v in g.jobs.items()} == {"teacher": 1, "label": 1, "train": 1}


def test_a_chain_waits_for_its_teacher_and_takes_its_model(world):
    first, second = world.post(iterations=2)
    world.tick()
    assert world.get(second).state == Stage.QUEUED
    for kind in (JobKind.TEACHER, JobKind.LABEL, JobKind.TRAIN):
        world.finish(first, kind)
        world.tick()
    assert world.get(first).state == Stage.SUCCEEDED
    g = world.get(second)
    assert g.state == Stage.LABELING and g.teacher_uri == world.get(first).model_uri
    assert JobKind.TEACHER not in g.jobs
    # each student's robustness is relative to the chain's first teacher, not to its own
    for gid in (first, second):
        spec = json.loads(open(Layout(world.get(gid).output).spec).read())
        assert spec["robustness_baseline"] == Layout(world.get(first).output).teacher_model


def test_a_named_robustness_baseline_is_checked_and_used_by_every_generation(world, tmp_path):
    with pytest.raises(InvalidRequest, match="robustness_baseline: .* is not under an allowed source root"):
        world.post(robustness_baseline=str(tmp_path))
    with pytest.raises(InvalidRequest, match="robustness_baseline: .* is not a model folder"):
        world.post(robustness_baseline=str(world.sources / "labeled"))
    baseline = world.sources / "baseline"
    _model(str(baseline), accuracy=0.7)
    first, second = world.post(iterations=2, robustness_baseline=str(baseline), teacher=str(baseline))
    world.tick()
    for kind in (JobKind.LABEL, JobKind.TRAIN):
        world.finish(first, kind)
        world.tick()
    for gid in (first, second):
        assert json.loads(open(Layout(world.get(gid).output).spec).read())["robustness_baseline"] == str(baseline)


def test_an_infrastructure_failure_is_retried_and_resumes_the_same_job(world):
    [gid] = world.post(teacher=None)
    world.tick()
    world.finish(gid, JobKind.TEACHER)
    world.tick()
    # A node died under the job: no error.json, so the cause is the cluster's.
    world.finish(gid, JobKind.LABEL, JobStatus.FAILED)
    world.tick()
    first = world.attempt(gid, JobKind.LABEL, 0)
    assert first.status == JobStatus.FAILED and first.cause == ErrorKind.INFRA and "NodeDiedError" in first.message
    assert world.get(gid).state == Stage.LABELING  # still at its stage while the next attempt comes
    world.tick()
    assert world.jobs.submitted[-1] == f"{gid}-label-2" and world.attempt(gid, JobKind.LABEL).n == 2
    # The job said itself that it ran out of memory.
    world.finish(gid, JobKind.LABEL, JobStatus.FAILED, JobError(kind=ErrorKind.INFRA, message="MemoryError: "))
    world.tick(2)
    world.finish(gid, JobKind.LABEL)
    world.tick()
    g = world.get(gid)
    assert g.state == Stage.TRAINING and [a.status for a in g.attempts_of(JobKind.LABEL)] == [
        JobStatus.FAILED,
        JobStatus.FAILED,
        JobStatus.SUCCEEDED,
    ]
    assert g.attempts_of(JobKind.LABEL)[1].message == "MemoryError: "


def test_attempts_run_out_and_the_generation_fails_with_the_last_cause(world):
    [gid] = world.post()
    world.tick()
    for n in range(1, world.settings.job_attempts + 1):
        assert world.jobs.submitted[-1] == f"{gid}-teacher-{n}"
        world.finish(gid, JobKind.TEACHER, JobStatus.FAILED)
        world.tick(2)
    g = world.get(gid)
    assert g.state == Stage.FAILED and len(g.attempts_of(JobKind.TEACHER)) == world.settings.job_attempts
    assert g.error.startswith(f"teacher job {gid}-teacher-3 failed after 3 attempts: ray.exceptions.NodeDiedError")


def test_a_user_error_fails_at_once_with_what_to_change(world):
    [gid] = world.post()
    world.tick()
    world.finish(gid, JobKind.TEACHER)
    world.tick()
    message = "UserError: no pseudo-label passed the confidence floor 0.3: lower curation.confidence_floor"
    world.finish(gid, JobKind.LABEL, JobStatus.FAILED, JobError(kind=ErrorKind.USER, message=message))
    world.tick(3)
    g = world.get(gid)
    assert g.state == Stage.FAILED and len(g.attempts_of(JobKind.LABEL)) == 1
    assert g.error == f"label job {gid}-label-1 failed: {message}"
    assert g.attempts_of(JobKind.LABEL)[0].cause == ErrorKind.USER


def test_backoff_waits_before_the_next_attempt(tmp_path):
    w = World(tmp_path)
    w.orchestrator.retry_backoff_seconds = 60
    [gid] = w.post()
    w.tick()
    w.finish(gid, JobKind.TEACHER, JobStatus.FAILED)
    w.tick(3)
    first = w.attempt(gid, JobKind.TEACHER)
    assert w.jobs.submitted == [f"{gid}-teacher-1"] and first.retry_after is not None
    assert dt.timedelta(seconds=59) < first.retry_after - first.finished_at <= dt.timedelta(seconds=61)
    # Once the wait is over, the next attempt goes, and it waits twice as long after failing in turn.
    w.store.update(
        w.get(gid),
        jobs=w.get(gid).with_attempts(JobKind.TEACHER, [first.model_copy(update={"retry_after": first.finished_at})]),
    )
    w.tick()
    assert w.jobs.submitted[-1] == f"{gid}-teacher-2"
    w.finish(gid, JobKind.TEACHER, JobStatus.FAILED)
    w.tick()
    second = w.attempt(gid, JobKind.TEACHER)
    assert dt.timedelta(seconds=119) < second.retry_after - second.finished_at <= dt.timedelta(seconds=121)


def test_a_job_stopped_from_outside_is_retried(world):
    [gid] = world.post()
    world.tick()
    world.finish(gid, JobKind.TEACHER, JobStatus.STOPPED)
    world.tick(2)
    assert world.jobs.submitted == [f"{gid}-teacher-1", f"{gid}-teacher-2"]
    assert world.attempt(gid, JobKind.TEACHER, 0).message == "the job was stopped outside the service"


def test_a_restart_between_recording_and_submitting_submits_once(world):
    [gid] = world.post()
    world.jobs.down = True
    world.tick()  # Ray is down: nothing is recorded
    assert world.get(gid).state == Stage.QUEUED and world.get(gid).jobs == {}
    world.jobs.down = False

    # The control plane recorded the attempt and died before submitting it.
    original = world.jobs.submit
    world.jobs.submit = lambda *a, **k: (_ for _ in ()).throw(SystemExit("killed"))
    with pytest.raises(SystemExit):
        world.orchestrator.advance(world.get(gid))
    world.jobs.submit = original
    assert not world.attempt(gid, JobKind.TEACHER).submitted and world.jobs.submitted == []

    restarted = World.__new__(World)
    restarted.__dict__.update(world.__dict__)
    restarted.orchestrator = Orchestrator(world.store, world.jobs, retry_backoff_seconds=0)
    restarted.tick(3)
    assert world.jobs.submitted == [f"{gid}-teacher-1"] and world.attempt(gid, JobKind.TEACHER).submitted


def test_a_restart_after_submitting_reattaches_to_the_running_job(world):
    [gid] = world.post()
    world.tick()
    world.jobs.status[f"{gid}-teacher-1"] = JobStatus.RUNNING
    fresh = Orchestrator(world.store, world.jobs)  # a new control plane process
    fresh.tick()
    fresh.tick()
    assert world.jobs.submitted == [f"{gid}-teacher-1"]
    assert world.get(gid).state == Stage.TRAINING_TEACHER


def test_a_head_that_forgot_a_submitted_job_counts_as_an_infrastructure_failure(world):
    [gid] = world.post()
    world.tick()
    world.jobs.status.clear()  # a new Ray head: it has never heard of the job
    world.tick(2)
    first = world.attempt(gid, JobKind.TEACHER, 0)
    assert first.cause == ErrorKind.INFRA and "head was restarted" in first.message
    assert world.jobs.submitted[-1] == f"{gid}-teacher-2"


def test_ray_down_changes_nothing(world):
    [gid] = world.post()
    world.tick()
    world.jobs.down = True
    world.tick(3)
    assert world.get(gid).state == Stage.TRAINING_TEACHER and not world.orchestrator.ray_reachable
    assert len(world.get(gid).attempts_of(JobKind.TEACHER)) == 1


def test_cancel_stops_the_running_job_then_its_chain(world):
    first, second = world.post(iterations=2)
    world.tick()
    world.jobs.status[f"{first}-teacher-1"] = JobStatus.RUNNING
    world.control.cancel(first, world.me)
    world.tick()
    assert world.jobs.stopped == [f"{first}-teacher-1"] and world.get(first).state == Stage.TRAINING_TEACHER
    world.tick()
    assert world.get(first).state == Stage.CANCELLED and world.get(first).error == "cancelled on request"
    assert (
        world.get(second).state == Stage.CANCELLED
        and world.get(second).error == f"teacher generation {first} cancelled"
    )
    assert world.attempt(first, JobKind.TEACHER).status == JobStatus.STOPPED
    with pytest.raises(Conflict, match="already cancelled"):
        world.control.cancel(first, world.me)


def test_cancel_while_waiting_for_the_next_attempt(tmp_path):
    w = World(tmp_path)
    w.orchestrator.retry_backoff_seconds = 600
    [gid] = w.post()
    w.tick()
    w.finish(gid, JobKind.TEACHER, JobStatus.FAILED)
    w.tick()
    w.control.cancel(gid, w.me)
    w.tick()
    assert w.get(gid).state == Stage.CANCELLED and w.jobs.submitted == [f"{gid}-teacher-1"]


def test_retry_resumes_a_failed_generation_and_its_chain_in_place(world):
    first, second = world.post(iterations=2)
    world.tick()
    world.finish(first, JobKind.TEACHER)
    world.tick()
    world.finish(first, JobKind.LABEL)
    world.tick()
    world.finish(
        first, JobKind.TRAIN, JobStatus.FAILED, JobError(kind=ErrorKind.USER, message="ValueError: a bad eval folder")
    )
    world.tick(2)
    assert world.get(first).state == Stage.FAILED and world.get(second).state == Stage.FAILED
    output = world.get(first).output

    with pytest.raises(Conflict, match="only a failed or cancelled one"):
        world.control.retry(world.post()[0], world.me)  # a queued generation
    g = world.control.retry(first, world.me)
    assert g.state == Stage.QUEUED and g.retries == 1 and g.error is None
    assert world.get(second).state == Stage.QUEUED and world.get(second).retries == 1
    again = world.control.retry(first, world.me)  # asked again while it runs: nothing new
    assert again.retries == 1

    world.tick()
    g = world.get(first)
    # Teacher and labels are done: only the student trains again, in the same folder.
    assert g.state == Stage.TRAINING and g.output == output
    assert [sid for sid in world.jobs.submitted if sid.startswith(first)] == [
        f"{first}-teacher-1",
        f"{first}-label-1",
        f"{first}-train-1",
        f"{first}-train-2",
    ]
    assert world.control.retry(first, world.me).retries == 1
    world.finish(first, JobKind.TRAIN)
    world.tick(2)
    assert world.get(first).state == Stage.SUCCEEDED and world.get(second).state == Stage.LABELING
    with pytest.raises(Conflict, match="is succeeded"):
        world.control.retry(first, world.me)


def test_retry_gives_a_new_round_of_attempts(world):
    [gid] = world.post()
    world.tick()
    for _ in range(world.settings.job_attempts):
        world.finish(gid, JobKind.TEACHER, JobStatus.FAILED)
        world.tick(2)
    assert world.get(gid).state == Stage.FAILED
    world.control.retry(gid, world.me)
    world.tick()
    world.finish(gid, JobKind.TEACHER, JobStatus.FAILED)
    world.tick(2)
    g = world.get(gid)
    assert g.state == Stage.TRAINING_TEACHER and [a.round for a in g.attempts_of(JobKind.TEACHER)] == [0, 0, 0, 1, 1]


def test_a_cancelled_generation_retried_resumes_its_stopped_job(world):
    [gid] = world.post()
    world.tick()
    world.finish(gid, JobKind.TEACHER)
    world.tick()
    world.jobs.status[f"{gid}-label-1"] = JobStatus.RUNNING
    world.control.cancel(gid, world.me)
    world.tick(2)
    assert world.get(gid).state == Stage.CANCELLED
    world.control.retry(gid, world.me)
    world.tick()
    assert world.get(gid).state == Stage.LABELING and world.jobs.submitted[-1] == f"{gid}-label-2"


@pytest.mark.parametrize("limit", [1, 3])
def test_admission_runs_at_most_the_limit_and_the_rest_wait_queued(tmp_path, limit):
    w = World(tmp_path, max_running_jobs=limit)
    chains = [w.post(iterations=2) for _ in range(10)]
    most = 0
    for _ in range(200):
        w.tick()
        running = w.jobs.running()
        most = max(most, len(running))
        assert len(running) <= limit
        active = [g for chain in chains for g in map(w.get, chain) if g.state.running]
        assert len(active) <= limit
        if not running:
            break
        for sid in running:  # every running job succeeds before the next tick
            gid, kind = sid.rsplit("-", 2)[0], JobKind(sid.rsplit("-", 2)[1])
            w.finish(gid, kind)
    assert most == limit
    assert all(w.get(gid).state == Stage.SUCCEEDED for chain in chains for gid in chain)


def test_a_store_that_fails_leaves_the_generation_where_it_is_until_it_works(world, caplog):
    """The generation's folder cannot be written (a file stands where it goes: the store answers an error): the
    generation stays queued, with one warning line per poll and no traceback, and is admitted once it can."""
    from prometheus_client import REGISTRY

    def storage_errors() -> float:
        return REGISTRY.get_sample_value("nstudent_orchestrator_errors_total", {"kind": "storage"}) or 0.0

    [gid] = world.post()
    output = world.get(gid).output
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:  # where the folder should be
        f.write("not a folder")
    before = storage_errors()
    with caplog.at_level("WARNING", logger="service.orchestrator"):
        world.tick(2)
    assert world.get(gid).state == Stage.QUEUED and world.jobs.submitted == []
    assert storage_errors() == before + 2
    warnings = [r for r in caplog.records if r.name == "service.orchestrator"]
    assert len(warnings) == 2 and all("the store failed" in r.getMessage() and not r.exc_info for r in warnings)
    os.remove(output)
    world.tick()
    assert world.get(gid).state == Stage.TRAINING_TEACHER and world.jobs.submitted == [f"{gid}-teacher-1"]
