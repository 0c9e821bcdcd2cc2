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


@pytest.fixture(scope="session")
def postgres_url():
    """A private PostgreSQL server on loopback for the session (initdb + pg_ctl), as a SQLAlchemy URL."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        if REQUIRE_POSTGRES:
            pytest.fail("PostgreSQL (initdb, pg_ctl) is required but not installed")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
    root = tempfile.mkdtemp(prefix="nst-pg-", dir="/tmp")
    data = os.path.join(root, "data")
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = cluster.free_port()
    subprocess.run([*as_user, initdb, "-D", data, "-U", "postgres", "--auth=trust"], check=True, capture_output=True)
    subprocess.run(
        [
            *as_user,
            pg_ctl,
            "-D",
            data,
            "-l",
            os.path.join(root, "log"),
            "-w",
            "start",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Each store test runs on SQLite and on PostgreSQL (a fresh database each)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/nstudent.db"
        return
    import sqlalchemy as sa

    base = request.getfixturevalue("postgres_url")
    name = f"t_{os.urandom(6).hex()}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    yield base.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()
