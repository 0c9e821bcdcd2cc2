"""The control plane through a database outage: PostgreSQL stopped under a running server, then started again.

A real PostgreSQL (``Postgres``, the test's own, so the session's server keeps running), the real application
and orchestrator thread, and the in-memory Jobs API of ``test_orchestrator`` (no Ray: what is tested is the
control plane's own state).
"""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from api.app import create_app
from curation.layout import Layout
from service.principals import Role
from service.states import JobKind, JobStatus, Stage
from tests.postgres import Postgres
from tests.service.test_orchestrator import World, _model

READ = {"Authorization": "Bearer reader-token"}


def _until(check, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def _database_errors() -> float:
    return REGISTRY.get_sample_value("nstudent_orchestrator_errors_total", {"kind": "database"}) or 0.0


def test_a_database_restart_answers_503_and_loses_no_step(tmp_path):
    """While PostgreSQL is down the API answers 503 (readiness names the database) and the orchestrator keeps
    polling; a job that ended during the outage is recorded once the database is back, and the generation
    goes on to its next job."""
    pg = Postgres()
    try:
        world = World(tmp_path, database_url=pg.url, poll_seconds=0.2)
        world.control.principals.add("reader-token", Role.READ)
        with TestClient(create_app(world.control)) as client:  # migrations, then the orchestrator's thread
            [gid] = world.post()
            _until(lambda: world.jobs.submitted == [f"{gid}-teacher-1"])
            g = world.get(gid)
            teacher_job = g.attempts_of(JobKind.TEACHER)[-1].id
            errors_before = _database_errors()

            pg.stop()  # fast: every connection closed, as in a restart or a failover
            # The teacher job ends while the database is down: only the database can record it.
            _model(Layout(g.output).teacher_model, accuracy=0.5)
            world.jobs.status[teacher_job] = JobStatus.SUCCEEDED
            r = client.get(f"/generations/{gid}", headers=READ)
            assert r.status_code == 503 and "database" in r.json()["detail"], r.text
            assert r.headers["Retry-After"] == "5"
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "database" in ready.json()["problems"]
            _until(lambda: _database_errors() >= errors_before + 2)  # the loop goes on polling
            assert world.orchestrator._thread.is_alive()
            assert world.jobs.submitted == [teacher_job]  # nothing was submitted blind

            pg.start()
            _until(lambda: client.get("/readyz").status_code == 200)
            _until(lambda: world.get(gid).state == Stage.LABELING)
            g = world.get(gid)
            assert [a.status for a in g.attempts_of(JobKind.TEACHER)] == [JobStatus.SUCCEEDED]
            assert world.jobs.submitted == [teacher_job, f"{gid}-label-1"]
            r = client.get(f"/generations/{gid}", headers=READ)
            assert r.status_code == 200 and r.json()["stage"] == "labeling"
        world.store.close()
    finally:
        pg.remove()


def test_start_up_waits_for_a_database_that_is_not_up_yet(tmp_path):
    """A server whose database starts after it (a database or a proxy beside it) waits for it, then migrates
    and runs; with no database within ``database_wait_seconds`` it gives up with the database's error."""
    import threading

    import pytest
    from sqlalchemy.exc import OperationalError

    from service.control import ControlPlane
    from service.principals import Principals
    from service.settings import Settings
    from service.store import Store
    from tests.service.test_orchestrator import FakeJobs

    def control_plane(wait: float) -> ControlPlane:
        settings = Settings(data_dir=tmp_path / "data", database_url=pg.url, database_wait_seconds=wait)
        return ControlPlane(settings, Store(settings.database), FakeJobs(), Principals())

    pg = Postgres()
    try:
        pg.stop()
        impatient = control_plane(1)
        started = time.monotonic()
        with pytest.raises(OperationalError):
            impatient.start()
        assert 1 <= time.monotonic() - started < 10
        impatient.store.close()

        control = control_plane(60)
        starting = threading.Thread(target=control.start)
        starting.start()
        time.sleep(2)
        assert starting.is_alive()  # still waiting
        pg.start()
        starting.join(timeout=60)
        assert not starting.is_alive() and control.orchestrator._thread.is_alive()
        assert list(control.store.unfinished()) == []  # the schema is there: the migrations ran
        control.stop()
    finally:
        pg.remove()
