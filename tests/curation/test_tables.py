"""Parquet read by the project's own tasks (curation.tables), never by Ray's footer-reading actors."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import tables


def _write(folder, parts: list[int]) -> list[int]:
    folder.mkdir()
    ids, start = [], 0
    for i, rows in enumerate(parts):
        part = list(range(start, start + rows))
        pq.write_table(
            pa.table({"id": part, "label": [x % 7 for x in part]}), folder / f"part-{i:03d}.parquet", row_group_size=5
        )
        ids += part
        start += rows
    (folder / "notes.txt").write_text("not a Parquet file")
    return ids


def test_read_units_group_whole_files_in_order(tmp_path, monkeypatch):
    _write(tmp_path / "m", [3, 4, 5])
    assert [len(u) for u in tables.read_units(str(tmp_path / "m"))] == [3]
    monkeypatch.setattr(tables, "READ_UNIT_BYTES", 1)  # every file its own unit
    units = tables.read_units(str(tmp_path / "m"))
    assert [u[0].rsplit("/", 1)[1] for u in units] == ["part-000.parquet", "part-001.parquet", "part-002.parquet"]
    assert tables.read_units(str(tmp_path / "m" / "part-001.parquet")) == [[str(tmp_path / "m" / "part-001.parquet")]]
    assert tables.read_units(str(tmp_path / "nothing-here")) == []


def test_tables_gather_short_batches_across_files(tmp_path, monkeypatch):
    ids = _write(tmp_path / "m", [12, 9])
    monkeypatch.setattr(tables, "BATCH_ROWS", 8)
    files = tables.read_units(str(tmp_path / "m"))[0]
    got = list(tables.tables(files, ["id"]))
    # at least BATCH_ROWS rows a table (a file's short tail joins the next file's rows), in order
    assert [t.num_rows for t in got] == [8, 12, 1]
    assert pa.concat_tables(got).column("id").to_pylist() == ids
    assert got[0].column_names == ["id"]


def test_read_is_every_row_once_without_footer_actors(ray_cluster, tmp_path, monkeypatch):
    from ray._private.state import actors

    ids = _write(tmp_path / "m", [40, 1, 25, 60])
    monkeypatch.setattr(tables, "READ_UNIT_BYTES", 1)
    ds = tables.read(str(tmp_path / "m"), ["id", "label"], num_cpus=0.25)
    rows = pa.concat_tables(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    assert sorted(rows.column("id").to_pylist()) == ids and rows.column_names == ["id", "label"]
    assert np.array_equal(rows.column("label").to_numpy(), rows.column("id").to_numpy() % 7)
    footer_readers = [a["ActorClassName"] for a in actors().values() if "Footer" in a["ActorClassName"]]
    assert footer_readers == []
    with pytest.raises(FileNotFoundError, match="no Parquet file"):
        tables.read(str(tmp_path / "empty"), ["id"])
