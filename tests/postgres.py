"""A private PostgreSQL server on loopback for tests (Debian's packages; ``.ci/run`` installs them)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

import pytest

from service import cluster

# CI installs PostgreSQL from Debian's packages and sets this, so a missing server fails instead of skipping.
REQUIRE_POSTGRES = os.environ.get("NSTUDENT_REQUIRE_POSTGRES") == "1"


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class Postgres:
    """A private PostgreSQL server on loopback (initdb + pg_ctl) in a folder of its own, which a test may stop and
    start again on the same port; ``url`` is its SQLAlchemy URL."""

    def __init__(self):
        initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (initdb and self.pg_ctl):
            if REQUIRE_POSTGRES:
                pytest.fail("PostgreSQL (initdb, pg_ctl) is required but not installed")
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
        self.root = tempfile.mkdtemp(prefix="nst-pg-", dir="/tmp")
        self.data = os.path.join(self.root, "data")
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.root, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = cluster.free_port()
        subprocess.run(
            [*self.as_user, initdb, "-D", self.data, "-U", "postgres", "--auth=trust"], check=True, capture_output=True
        )
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        log = os.path.join(self.root, "log")
        subprocess.run(
            [*self.as_user, self.pg_ctl, "-D", self.data, "-l", log, "-w", "start", "-o", options],
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        """``fast``: what a restart or a failover does to clients (their connections are closed);
        ``immediate``: a crash."""
        subprocess.run([*self.as_user, self.pg_ctl, "-D", self.data, "-m", mode, "stop"], capture_output=True)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
