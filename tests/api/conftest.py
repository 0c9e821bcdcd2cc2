import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service.control import ControlPlane
from service.jobs import Jobs
from service.principals import Principals, Role
from service.settings import Settings
from service.store import Store

READ, WRITE = {"Authorization": "Bearer reader-token"}, {"Authorization": "Bearer writer-token"}
# Nothing listens on port 9 of loopback: the app runs with Ray down, so generations stay where the API put them.
RAY_DOWN = "http://127.0.0.1:9"


def make_app(data_dir, source_root):
    settings = Settings(data_dir=data_dir, source_roots=[str(source_root)], poll_seconds=0.2)
    principals = Principals()
    principals.add("reader-token", Role.READ)
    principals.add("writer-token", Role.WRITE)
    control = ControlPlane(settings, Store(settings.database), Jobs(RAY_DOWN, timeout=1), principals)
    return create_app(control)


@pytest.fixture
def app(tmp_path, digits_root):
    return make_app(tmp_path / "data", digits_root)


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c
