import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import sources, storage
from workers import ledger


@pytest.fixture
def manifest(tmp_path):
    """Two files: row groups of 100, 100, 50 rows, then one of 7."""
    folder = tmp_path / "m.parquet"
    folder.mkdir()
    pq.write_table(pa.table({"uri": [f"a/{i}.png" for i in range(250)]}), str(folder / "0.parquet"), row_group_size=100)
    pq.write_table(pa.table({"uri": [f"b/{i}.png" for i in range(7)]}), str(folder / "1.parquet"))
    return str(folder)


def test_shards_cover_every_row_once(manifest):
    plan = ledger.ShardPlan.from_manifest(manifest, 30)
    assert plan.num_shards == 4 + 4 + 2 + 1 and plan.num_rows == 257
    assert plan.sizes().tolist() == [30, 30, 30, 10, 30, 30, 30, 10, 30, 20, 7]
    assert plan.locate(5)[1:] == (1, 30, 60) and plan.locate(10)[1:] == (0, 0, 7)
    uris = []
    for shard in range(plan.num_shards):
        rows = sources.read_unlabeled(*plan.locate(shard))
        assert rows.num_rows == plan.sizes()[shard]
        uris += rows.column("uri").to_pylist()
    assert uris == [f"a/{i}.png" for i in range(250)] + [f"b/{i}.png" for i in range(7)]


def test_read_units_are_whole_shards_inside_a_row_group(manifest):
    plan = ledger.ShardPlan.from_manifest(manifest, 30)
    todo = np.ones(plan.num_shards, dtype=bool)
    assert plan.units(60, todo).tolist() == [[0, 2], [2, 4], [4, 6], [6, 8], [8, 10], [10, 11]]
    assert plan.units(10, todo).tolist() == [[s, s + 1] for s in range(11)]  # at least one shard
    assert plan.units(10**6, todo).tolist() == [[0, 4], [4, 8], [8, 10], [10, 11]]
    todo[[0, 1, 4, 5, 9, 10]] = False  # finished shards: units with nothing to do are left out
    assert plan.units(60, todo).tolist() == [[2, 4], [6, 8], [8, 10]]
    assert plan.locate(6, 8)[1:] == (1, 60, 100)
    with pytest.raises(ValueError, match="span row groups"):
        plan.locate(3, 5)


def test_open_run_keeps_the_same_run_and_clears_another(tmp_path):
    out = str(tmp_path / "labels")
    run = {"source": "s", "model": "m", "top_k": 5}
    assert not ledger.open_run(out, run)
    for name in (
        "predictions/p.parquet",
        "rejects/r.parquet",
        "ledger/p.json",
        "_staging/predictions/x.parquet",
        "source.parquet",
        "labeling.json",
    ):
        storage.write_bytes(storage.join(out, name), b"x")
    assert ledger.open_run(out, dict(run))
    assert len(storage.list_files(out)) == 7
    assert not ledger.open_run(out, {**run, "top_k": 3})
    assert storage.list_files(out) == [storage.join(out, ledger.RUN_RECORD)]
    assert json.loads((tmp_path / "labels" / ledger.RUN_RECORD).read_text())["top_k"] == 3
    assert not ledger.open_run(out, {**run, "top_k": 3}, restart=True)


def test_load_sums_committed_rows_and_removes_uncommitted_files(manifest, tmp_path):
    plan = ledger.ShardPlan.from_manifest(manifest, 30)
    out = str(tmp_path / "labels")
    ids = np.arange(100, dtype=np.int64)

    def staged(part: str, name: str, values: np.ndarray) -> str:
        uri = storage.join(out, ledger.STAGING, part, f"{name}.parquet")
        storage.write_bytes(uri, b"")
        pq.write_table(pa.table({"image_id": values}), uri)
        return uri

    ledger.commit(
        out,
        "a",
        {0: 30, 1: 12},
        {"predicted": 40, "rejected:corrupt": 2},
        {ledger.PREDICTIONS: staged("predictions", "a", ids[:40]), ledger.REJECTS: staged("rejects", "a", ids[40:42])},
    )
    ledger.commit(
        out,
        "b",
        {1: 18, 2: 5},
        {"predicted": 23},
        {ledger.PREDICTIONS: staged("predictions", "b", ids[42:65]), ledger.REJECTS: None},
    )
    # a task killed after moving its file, before its ledger entry; and one killed while staging
    storage.move(staged("predictions", "c", ids[65:70]), storage.join(out, ledger.PREDICTIONS, "c.parquet"))
    staged("rejects", "d", ids[70:71])

    state = ledger.load(out, plan)
    assert state.done[:3].tolist() == [30, 30, 5] and state.done[3:].sum() == 0 and state.rows == 65
    assert state.counts == {"predicted": 63, "rejected:corrupt": 2}
    committed = [("predictions", "a.parquet"), ("rejects", "a.parquet"), ("predictions", "b.parquet")]
    assert sorted(storage.list_files(out, suffix=".parquet")) == sorted(storage.join(out, p, f) for p, f in committed)
    # ids of the partly done shard 2 come from the one entry that touched it
    assert ledger.written_ids(out, state, np.array([2])).tolist() == list(range(42, 65))
    assert ledger.written_ids(out, state, np.array([1])).tolist() == list(range(65))
    assert ledger.written_ids(out, state, np.array([], dtype=np.int64)).size == 0

    # more rows committed for a shard than it has: the folder is not this source's
    ledger.commit(out, "e", {3: 11}, {"predicted": 11}, {ledger.PREDICTIONS: None, ledger.REJECTS: None})
    with pytest.raises(ValueError, match="more rows than the source"):
        ledger.load(out, plan)


def test_tar_shards_are_listed_once_and_sized_when_streamed(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    for name in ("b.tar", "a.tar", "notes.txt", ".hidden.tar"):
        (folder / name).write_bytes(b"x")
    out = str(tmp_path / "labels")
    plan = ledger.TarPlan.listed(str(folder), out)
    assert plan.files == [str(folder / "a.tar"), str(folder / "b.tar")]
    (folder / "0.tar").write_bytes(b"x")  # added later: a resumed run keeps the shard numbers it started with
    assert ledger.TarPlan.listed(str(folder), out).files == plan.files
    assert plan.units(10**6, np.array([True, True])).tolist() == [[0, 1], [1, 2]]
    assert plan.units(10**6, np.array([False, True])).tolist() == [[1, 2]]

    state = ledger.load(out, plan)
    assert state.sizes.tolist() == [-1, -1]  # nothing streamed yet: neither shard is known to be finished
    ledger.record_size(out, 1, 7)
    assert ledger.load(out, plan).sizes.tolist() == [-1, 7]
    # a run with anything different starts over: the listing and the sizes go too
    assert not ledger.open_run(out, {"source": "other"})
    assert not storage.exists(storage.join(out, ledger.SOURCE_SHARDS))
    assert ledger.load(out, plan).sizes.tolist() == [-1, -1]


def test_parquet_bytes_shards_are_row_groups(tmp_path):
    path = str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"image": [b"x"] * 10}), path, row_group_size=4)
    plan = ledger.ShardPlan.per_row_group(path)
    assert plan.sizes().tolist() == [4, 4, 2]
    assert plan.units(65_536, np.ones(3, dtype=bool)).tolist() == [[0, 1], [1, 2], [2, 3]]
    assert [plan.locate(s)[1:] for s in range(3)] == [(0, 0, 4), (1, 0, 4), (2, 0, 2)]
