import contextlib
import json
import shutil
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

from api.app import create_app
from bench.server import Server
from service import cluster
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


class Served:
    """The app of ``data_dir`` on a loopback port, run by uvicorn in a thread; ``stop`` and ``start`` again."""

    def __init__(self, data_dir, digits_root, port: int | None = None):
        self.data_dir, self.digits_root, self.port = data_dir, digits_root, port or cluster.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        app = make_app(self.data_dir, self.digits_root)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def app(tmp_path, digits_root):
    return make_app(tmp_path / "data", digits_root)


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c


# The tokens of `nstudent serve` in the end-to-end tests (a real process, its own Ray head).
SERVER_TOKENS = {"NSTUDENT_WRITE_TOKENS": "w-token", "NSTUDENT_READ_TOKENS": "r-token"}


def train(steps: int) -> dict:
    """A small training config on the digits: test_resnet at 32 px, a checkpoint every 10 steps."""
    return {
        "architecture": "test_resnet",
        "input_size": 32,
        "mean": [0.13] * 3,
        "std": [0.31] * 3,
        "steps": steps,
        "batch_size": 16,
        "unlabeled_ratio": 2,
        "warmup_steps": 2,
        "checkpoint_every": 10,
    }


@contextlib.contextmanager
def running_server(data_dir, digits_root, **env: str):
    """`nstudent serve` with its own Ray head, allowed to read the digits; stopped on exit, and its head too if a
    test left it running (only when a test failed before the server could stop it: never leak it)."""
    s = Server(
        data_dir,
        {
            **SERVER_TOKENS,
            "NSTUDENT_SOURCE_ROOTS": str(digits_root),
            "NSTUDENT_POLL_SECONDS": "0.5",
            "NSTUDENT_RAY_NUM_CPUS": "2",
            **env,
        },
    )
    try:
        yield s.start()
    finally:
        s.stop()
        record = data_dir / "ray" / "head.json"
        if record.exists():
            head = cluster.Head(**json.loads(record.read_text()))
            if cluster._alive(head.pid):
                cluster.stop_head(head)
            shutil.rmtree(head.temp_dir, ignore_errors=True)  # its logs and sockets, under /tmp
