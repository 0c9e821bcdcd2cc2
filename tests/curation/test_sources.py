import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import sources
from service import storage
from tests import s3


def make_folder(root, n: int) -> list[str]:
    paths = []
    for i in range(n):
        path = os.path.join(root, f"c{i % 4}", f"img{i:05d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x")
        paths.append(path)
    with open(os.path.join(root, ".hidden"), "wb") as f:
        f.write(b"x")
    return paths


@pytest.mark.parametrize("where", ["local", "s3"])
def test_index_lists_once_into_row_groups(tmp_path, where):
    paths = make_folder(str(tmp_path / "pool"), 1030)
    if where == "local":
        source, expected, out = str(tmp_path / "pool"), paths, str(tmp_path / "out" / "source.parquet")
    else:
        bucket = s3.new_bucket()
        expected = s3.upload_folder(str(tmp_path / "pool"), bucket + "/pool")
        source, out = bucket + "/pool", bucket + "/out/source.parquet"
        assert len(expected) == 1031
        expected = [u for u in expected if not u.endswith(".hidden")]

    assert sources.index(source, out, row_group_rows=100) == 1030
    fs, path = storage.resolve(out)
    pf = pq.ParquetFile(path, filesystem=fs)
    assert pf.schema_arrow.equals(sources.UNLABELED_SCHEMA)
    assert [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)] == [100] * 10 + [30]
    table = pf.read()
    assert sorted(table.column("uri").to_pylist()) == sorted(expected)
    assert table.column("image_id").to_pylist() == [sources.image_id(u) for u in table.column("uri").to_pylist()]
    assert storage.list_files(out.rsplit("/", 1)[0]) == [out]  # no temporary file left beside it
    assert sources.row_groups(out) == [(out, g, 100) for g in range(10)] + [(out, 10, 30)]


def test_index_of_an_empty_folder_is_an_empty_manifest(tmp_path):
    os.makedirs(tmp_path / "empty")
    out = str(tmp_path / "m.parquet")
    assert sources.index(str(tmp_path / "empty"), out) == 0
    assert pq.read_table(out).num_rows == 0
    assert sources.row_groups(out) == []


def test_read_unlabeled_slices_a_row_group_and_fills_ids(tmp_path):
    uris = [f"s3://b/p/{i}.jpg" for i in range(250)]
    path = str(tmp_path / "m.parquet")
    # a user manifest: uri only, large_string, row groups of 100
    pq.write_table(pa.table({"uri": pa.array(uris, pa.large_string()), "extra": list(range(250))}), path,
                   row_group_size=100)
    assert sources.row_groups(path) == [(path, 0, 100), (path, 1, 100), (path, 2, 50)]
    part = sources.read_unlabeled(path, 1, 30, 75)
    assert part.schema.equals(sources.UNLABELED_SCHEMA)
    assert part.column("uri").to_pylist() == uris[130:175]
    assert part.column("image_id").to_pylist() == [sources.image_id(u) for u in uris[130:175]]
    assert sources.read_unlabeled(path, 2, 0, 50).column("uri").to_pylist() == uris[200:]
    assert sources.read_unlabeled(path, 0, 100, 100).num_rows == 0


def test_manifest_files_of_a_folder_manifest(tmp_path):
    folder = tmp_path / "m.parquet"
    os.makedirs(folder)
    for i in range(3):
        pq.write_table(pa.table({"uri": [f"u{i}-{j}" for j in range(5)]}), str(folder / f"part-{i}.parquet"))
    (folder / "_SUCCESS").write_bytes(b"")
    files = sources.manifest_files(str(folder))
    assert files == [str(folder / f"part-{i}.parquet") for i in range(3)]
    assert [n for _, _, n in sources.row_groups(str(folder))] == [5, 5, 5]
    with pytest.raises(ValueError, match="no such manifest"):
        sources.manifest_files(str(tmp_path / "nothing.parquet"))
