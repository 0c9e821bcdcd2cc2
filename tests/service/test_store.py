"""The state store on SQLite and PostgreSQL: migrations, chains, idempotency keys, optimistic locking."""

import pytest
import sqlalchemy as sa

from service.store import Dataset, Generation, StaleWrite, Store

AUDIT = ("tester", "create", "g-x", {})


def generation(gid: str, chain: str, index: int = 0, **kw) -> Generation:
    fields = dict(
        chain_id=chain,
        chain_index=index,
        spec={"labeled": "/data"},
        output=f"/out/{gid}",
        stage="queued",
        cancel_requested=False,
        jobs={},
        attempts=0,
        progress={},
        timings={},
        metrics={},
        version=0,
    )
    return Generation(id=gid, **{**fields, **kw})


@pytest.fixture
def store(database_url):
    s = Store(database_url)
    s.migrate()
    yield s
    s.close()


def test_migrations_are_idempotent_and_create_the_tables(store):
    store.migrate()  # a second start runs no migration again
    tables = set(sa.inspect(store.engine).get_table_names())
    assert {"generations", "datasets", "audit", "alembic_version"} <= tables
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0003"


def test_chain_roundtrip_with_json_and_paging(store):
    store.add_chain(
        [
            generation("g-a", "g-a", 0, idempotency_key="k1", request_hash="h"),
            generation("g-b", "g-a", 1, parent_id="g-a"),
        ],
        AUDIT,
    )
    store.add_chain([generation("g-c", "g-c")], AUDIT)
    chain = store.chain("g-a")
    assert [g.id for g in chain] == ["g-a", "g-b"] and chain[1].parent_id == "g-a"
    assert store.get("g-a").spec == {"labeled": "/data"}
    assert store.by_idempotency_key("k1", "default").id == "g-a" and store.by_idempotency_key("k2", "default") is None
    assert store.by_idempotency_key("k1", "team-a") is None
    rows, count = store.page(offset=0, limit=2)
    assert count == 3 and len(rows) == 2
    rows, count = store.page(offset=2, limit=2)
    assert count == 3 and len(rows) == 1
    assert store.page(offset=0, limit=10, stage="failed") == ([], 0)


def test_an_idempotency_key_is_taken_once_per_principal(store):
    store.add_chain([generation("g-a", "g-a", idempotency_key="same")], AUDIT)
    with pytest.raises(sa.exc.IntegrityError):
        store.add_chain([generation("g-b", "g-b", idempotency_key="same")], AUDIT)
    assert store.get("g-b") is None  # the whole chain was refused
    store.add_chain([generation("g-c", "g-c", idempotency_key="same", created_by="team-a")], AUDIT)
    assert store.by_idempotency_key("same", "team-a").id == "g-c"
    rows, count = store.page(offset=0, limit=10, created_by="team-a")
    assert [g.id for g in rows] == ["g-c"] and count == 1 and store.owner("g-c") == "team-a"
    entries, count = store.audit_log(offset=0, limit=10)
    assert count == 2 and entries[0].principal == "tester" and entries[0].action == "create"


def test_updates_refuse_a_stale_read(store):
    store.add_chain([generation("g-a", "g-a")], AUDIT)
    first = store.get("g-a")
    moved = store.update(first, stage="labeling", jobs={"label": "g-a-label"}, progress={"done": 5, "total": 9})
    assert (moved.version, moved.stage, moved.jobs, moved.progress["done"]) == (
        1,
        "labeling",
        {"label": "g-a-label"},
        5,
    )
    with pytest.raises(StaleWrite):
        store.update(first, stage="failed")  # based on version 0
    assert store.get("g-a").stage == "labeling"


def test_unfinished_puts_cancellations_first_and_skips_finished(store):
    store.add_chain([generation("g-a", "g-a")], AUDIT)
    store.add_chain([generation("g-b", "g-b", cancel_requested=True)], AUDIT)
    store.add_chain([generation("g-c", "g-c", stage="succeeded")], AUDIT)
    assert [g.id for g in store.unfinished()] == ["g-b", "g-a"]
    assert store.count_by_stage() == {"queued": 2, "succeeded": 1}


def test_datasets(store):
    d = Dataset(id="d-a", generation_id="g-a", manifest_uri="/m", rows=10, checksum="abc", stats={"rows": 10})
    store.put_dataset(d)
    store.put_dataset(d)  # recording the same dataset again replaces it
    got = store.dataset("d-a")
    assert (got.rows, got.stats, got.generation_id) == (10, {"rows": 10}, "g-a")
    assert store.dataset("d-b") is None


def test_the_attempts_migration_keeps_the_jobs_of_an_older_database(database_url):
    from alembic import command
    from alembic.config import Config

    from service.store import MIGRATIONS

    s = Store(database_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with s.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(
            sa.text(
                "INSERT INTO generations (id, created_at, updated_at, version, chain_id, chain_index, spec, output, "
                "stage, cancel_requested, jobs, attempts, progress, timings, metrics) VALUES ('g-a', :t, :t, 3, 'g-a', "
                "0, '{}', '/out', 'training', false, :jobs, 0, '{}', '{}', '{}')"
            ),
            {"t": "2026-01-01 00:00:00+00:00", "jobs": '{"label": "g-a-label", "train": "g-a-train"}'},
        )
    s.migrate()
    g = s.get("g-a")
    assert g.retries == 0 and g.version == 3
    from service.states import JobKind

    [train] = g.attempts_of(JobKind.TRAIN)
    assert (train.id, train.n, train.submitted) == ("g-a-train", 1, True)
    assert [a.id for a in g.attempts_of(JobKind.LABEL)] == ["g-a-label"]
    s.close()
