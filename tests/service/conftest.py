import os

import pytest

from tests.postgres import Postgres


@pytest.fixture(scope="session")
def postgres_url():
    """A private PostgreSQL server for the session, as a SQLAlchemy URL."""
    server = Postgres()
    yield server.url
    server.remove()


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
