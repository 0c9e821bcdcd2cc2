import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service import storage
from tests import s3


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    return str(tmp_path / "root") if request.param == "local" else s3.new_bucket() + "/root"


def test_round_trip(root):
    storage.write_bytes(storage.join(root, "a", "blob.bin"), b"\x00\x01payload")
    storage.write_json(storage.join(root, "b", "meta.json"), {"k": [1, 2], "s": "x"})
    assert storage.read_bytes(storage.join(root, "a", "blob.bin")) == b"\x00\x01payload"
    assert storage.read_json(storage.join(root, "b", "meta.json")) == {"k": [1, 2], "s": "x"}
    assert storage.exists(storage.join(root, "a", "blob.bin"))
    assert not storage.exists(storage.join(root, "a", "nothing.bin"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "a", "nothing.bin"))
    # no temporary file is left beside a written one
    assert storage.list_files(root) == [storage.join(root, "a", "blob.bin"), storage.join(root, "b", "meta.json")]

    storage.move(storage.join(root, "a", "blob.bin"), storage.join(root, "c", "moved.bin"))
    assert storage.read_bytes(storage.join(root, "c", "moved.bin")) == b"\x00\x01payload"
    assert not storage.exists(storage.join(root, "a", "blob.bin"))
    storage.delete_file(storage.join(root, "c", "moved.bin"))
    storage.delete_file(storage.join(root, "c", "moved.bin"))  # deleting what is gone is no error
    storage.delete_dir_contents(storage.join(root, "b"))
    storage.delete_dir_contents(storage.join(root, "never-made"))
    assert storage.list_files(root) == []


def test_parquet_through_the_resolved_filesystem(root):
    table = pa.table({"x": list(range(10)), "s": [str(i) for i in range(10)]})
    fs, path = storage.resolve(storage.join(root, "t.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_iter_files_streams_every_page_and_skips_hidden(tmp_path):
    # more than one page of S3's listing (1,000 keys), nested folders, hidden files
    local = tmp_path / "pool"
    names = [f"d{i % 3}/sub/f{i:04d}.png" for i in range(1203)] + ["top.jpg"]
    for name in names + [".hidden", "d0/.DS_Store", ".cache/x.png"]:
        os.makedirs(local / os.path.dirname(name), exist_ok=True)
        (local / name).write_bytes(b"x")
    uri = s3.new_bucket() + "/pool"
    uploaded = s3.upload_folder(str(local), uri)
    assert len(uploaded) == len(names) + 3

    listed = list(storage.iter_files(uri))
    assert listed == sorted(f"{uri}/{n}" for n in names)  # S3 lists keys in order
    assert sorted(storage.iter_files(str(local))) == sorted(str(local / n) for n in names)
    # a prefix is a folder: "pool" does not match "pool2/..."
    s3.client().put_object(Bucket=uri[5:].split("/")[0], Key="pool2/other.png", Body=b"x")
    assert len(list(storage.iter_files(uri))) == len(names)
    assert list(storage.iter_files(str(tmp_path / "missing"))) == []
