import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.s3proxy import Faults
from curation import storage
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


def test_read_many_keeps_order_and_returns_each_objects_own_error(root):
    uris = [storage.join(root, f"o{i:03d}.bin") for i in range(40)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, bytes([i]) * (i + 1))
    absent = storage.join(root, "absent.bin")
    asked = uris[:20] + [absent] + uris[20:] + ["gs://elsewhere/x.png"]
    for concurrency in (1, 8):
        got = storage.read_many(asked, concurrency)
        assert len(got) == 42
        assert got[:20] + got[21:41] == [bytes([i]) * (i + 1) for i in range(40)]
        assert isinstance(got[20], FileNotFoundError) and storage.is_object_error(got[20])
        assert isinstance(got[41], ValueError)  # not a URI the project can read: that object's error
    # a name that pyarrow would take for compressed data comes back as stored
    storage.write_bytes(storage.join(root, "x.gz"), b"not gzip")
    assert storage.read_many([storage.join(root, "x.gz")]) == [b"not gzip"]


def test_reads_writes_and_listing_lose_nothing_when_s3_fails_a_tenth_of_requests(flaky_s3):
    """503 SlowDown, 500, connection resets and GET answers cut half-way, 10% of requests: the retry policy
    (pyarrow for objects, boto3 for listing) absorbs them all; a missing object is still only missing."""
    root = s3.new_bucket() + "/pool"
    uris = [storage.join(root, f"d{i % 4}", f"o{i:03d}.bin") for i in range(120)]
    payloads = [os.urandom(2000 + i) for i in range(len(uris))]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(storage.write_bytes, uris, payloads))
    # Read three times: truncation hits GETs only (2.5% of them), and one pass of 121 GETs draws none about one
    # time in twenty; three passes, about one in ten thousand.
    for _ in range(3):
        got = storage.read_many(uris + [storage.join(root, "absent.bin")], concurrency=16)
        assert got[:-1] == payloads
        assert isinstance(got[-1], FileNotFoundError)
    assert list(storage.iter_files(root)) == sorted(uris)
    assert all(flaky_s3.counts[fault] > 0 for fault in ("slowdown", "internal", "reset", "truncate")), flaky_s3.counts


def test_a_store_that_keeps_failing_is_an_error_of_the_store_not_a_missing_object(s3_proxy):
    root = s3.new_bucket() + "/pool"
    uris = [storage.join(root, f"o{i}.bin") for i in range(4)]
    for uri in uris:
        storage.write_bytes(uri, b"x")
    saved = storage.S3_MAX_ATTEMPTS
    storage.S3_MAX_ATTEMPTS = 4  # fewer attempts than the default, so that the test waits less
    storage._filesystem.cache_clear()
    try:
        fs, path = storage.resolve(uris[0])
        s3_proxy.reset(Faults(slowdown=1.0))
        with pytest.raises(storage.StorageUnavailable, match="503"):
            storage.read_many(uris, concurrency=1)
        # every attempt of the policy was made, by the filesystem and by a copy of it shipped to another process
        # (pyarrow's own pickling would fall back to its default of 3 attempts)
        assert s3_proxy.counts["slowdown"] == 4
        for copy in (fs, pickle.loads(pickle.dumps(fs))):
            s3_proxy.reset(Faults(slowdown=1.0))
            with pytest.raises(OSError, match="503"):
                copy.open_input_stream(path).read()
            assert s3_proxy.counts["slowdown"] == 4
    finally:
        s3_proxy.reset()
        storage.S3_MAX_ATTEMPTS = saved
        storage._filesystem.cache_clear()
