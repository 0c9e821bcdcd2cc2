import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import sources, storage
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
    pq.write_table(
        pa.table({"uri": pa.array(uris, pa.large_string()), "extra": list(range(250))}), path, row_group_size=100
    )
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


# --- WebDataset tar shards and Parquet files of image bytes ---------------------------------------------------


def test_infer_format_from_extension_and_columns(tmp_path):
    from tests.containers import write_parquet_bytes, write_webdataset

    shard = write_webdataset(str(tmp_path / "wds"), 1, 2)[0][0]
    write_parquet_bytes(str(tmp_path / "bytes.parquet"), 3, hf=True)
    pq.write_table(pa.table({"uri": ["a.png"]}), str(tmp_path / "manifest.parquet"))
    pq.write_table(pa.table({"x": [1]}), str(tmp_path / "other.parquet"))
    F = sources.SourceFormat
    assert sources.infer_format(shard) is F.WEBDATASET
    assert sources.infer_format("s3://b/pool/000001.tar.gz") is F.WEBDATASET
    assert sources.infer_format(str(tmp_path / "bytes.parquet")) is F.PARQUET_BYTES
    assert sources.infer_format(str(tmp_path / "manifest.parquet")) is F.MANIFEST
    assert sources.infer_format(str(tmp_path / "wds")) is F.FILES  # a folder of shards names its format
    with pytest.raises(ValueError, match="neither"):
        sources.infer_format(str(tmp_path / "other.parquet"))
    assert sources.resolve_format(str(tmp_path / "wds"), "webdataset") is F.WEBDATASET
    assert sources.resolve_format(str(tmp_path / "manifest.parquet"), None) is F.MANIFEST
    with pytest.raises(ValueError):
        sources.resolve_format("x", "zip")


def test_member_uris_split_at_the_container():
    from curation import shards

    assert shards.split("s3://b/pool/000123.tar#abc.jpg") == ("s3://b/pool/000123.tar", "abc.jpg")
    assert shards.split("/d/x.parquet#17") == ("/d/x.parquet", "17")
    assert shards.split("/d/a#b.tar#dir/k#1.jpg") == ("/d/a#b.tar", "dir/k#1.jpg")
    assert shards.split("/d/photo#1.jpg") is None and shards.split("/d/x.tar") is None
    assert shards.key_field("dir/abc.seg.png") == ("dir/abc", "seg.png")
    assert shards.is_image_member("k.JPG") and not shards.is_image_member("k.seg.png")
    assert not shards.is_image_member("k.cls")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_webdataset_is_a_labeled_set(tmp_path, where):
    from tests.containers import CLASSES, write_webdataset

    paths, labels, _ = write_webdataset(str(tmp_path / "wds"), 2, 5)
    source = str(tmp_path / "wds")
    if where == "s3":
        bucket = s3.new_bucket()
        s3.upload_folder(source, bucket + "/wds")
        labels = {u.replace(source, bucket + "/wds"): v for u, v in labels.items()}
        source = bucket + "/wds"
    table, names = sources.labeled_source(source, fmt="webdataset")
    assert names == ["0", "1", "2"]  # integer .cls with no names anywhere: the indices name the classes
    assert dict(zip(table.column("uri").to_pylist(), table.column("label").to_pylist())) == labels
    assert table.column("image_id").to_pylist() == [sources.image_id(u) for u in table.column("uri").to_pylist()]
    # pinned to a model's classes, and one shard alone (inferred from .tar)
    one, _ = sources.labeled_source(source + "/pool-000001.tar", ["0", "1", "2", "3"])
    assert dict(zip(one.column("uri").to_pylist(), one.column("label").to_pylist())) == {
        u: v for u, v in labels.items() if "pool-000001.tar#" in u
    }

    # class names in .cls: sorted into indices, or placed in the order given
    named = str(tmp_path / "named")
    _, by_name, _ = write_webdataset(named, 1, 6, names=True)
    table, names = sources.labeled_source(named, fmt="webdataset")
    assert names == sorted(CLASSES)
    got = dict(zip(table.column("uri").to_pylist(), table.column("label").to_pylist()))
    assert got == {u: sorted(CLASSES).index(CLASSES[v]) for u, v in by_name.items()}
    table, _ = sources.labeled_source(named, ["eel", "dog", "cat", "yak"], fmt="webdataset")
    assert dict(zip(table.column("uri").to_pylist(), table.column("label").to_pylist())) == {
        u: ["eel", "dog", "cat"].index(CLASSES[v]) for u, v in by_name.items()
    }


def test_webdataset_image_without_cls_is_an_error(tmp_path):
    from tests.containers import tar_bytes
    from tests.helpers import image_bytes

    rng = np.random.default_rng(0)
    path = tmp_path / "x.tar"
    path.write_bytes(tar_bytes([("a.jpg", image_bytes(rng, "JPEG")), ("a.cls", b"1"), ("b.png", image_bytes(rng))]))
    with pytest.raises(ValueError, match=r"1 images without a \.cls member.*x\.tar#b\.png"):
        sources.labeled_source(str(path))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_parquet_bytes_is_a_labeled_set(tmp_path, where):
    from tests.containers import CLASSES, write_parquet_bytes

    folder = tmp_path / "pq"
    hf = write_parquet_bytes(str(folder / "hf.parquet"), 9, hf=True, seed=1)
    plain = write_parquet_bytes(str(folder / "plain.parquet"), 5, hf=False, seed=2)
    if where == "s3":
        bucket = s3.new_bucket()
        s3.upload_folder(str(folder), bucket + "/pq")
        base = bucket + "/pq"
        hf = {u.replace(str(folder), base): v for u, v in hf.items()}
        plain = {u.replace(str(folder), base): v for u, v in plain.items()}
    else:
        base = str(folder)
    # Hugging Face ClassLabel names in the file's metadata turn the int64 labels into names
    table, names = sources.labeled_source(base + "/hf.parquet")
    assert names == CLASSES
    assert dict(zip(table.column("uri").to_pylist(), table.column("label").to_pylist())) == hf
    assert table.column("uri").to_pylist() == [f"{base}/hf.parquet#{i}" for i in range(9)]
    # another class order: labels follow the names, not the source's indices
    order = ["dog", "eel", "cat"]
    table, names = sources.labeled_source(base + "/hf.parquet", order)
    assert names == order
    assert table.column("label").to_pylist() == [order.index(CLASSES[v]) for v in hf.values()]
    # plain binary images and string labels
    table, names = sources.labeled_source(base + "/plain.parquet", CLASSES)
    assert dict(zip(table.column("uri").to_pylist(), table.column("label").to_pylist())) == plain
    # a folder of such files names its format
    table, _ = sources.labeled_source(base, CLASSES, "parquet-bytes")
    assert table.num_rows == 14


def test_image_readers_stream_members_with_their_bytes(tmp_path):
    from curation import shards
    from tests.containers import webdataset_members, write_parquet_bytes, write_webdataset

    paths, labels, _ = write_webdataset(str(tmp_path / "wds"), 1, 7)
    members = dict(webdataset_members(0, 7)[0])
    chunks = list(sources.read_tar_images(paths[0], chunk_rows=3))
    assert [c.num_rows for c in chunks] == [3, 3, 1]
    table = pa.concat_tables(chunks)
    assert table.schema.equals(sources.IMAGE_ROWS_SCHEMA)
    assert table.column("uri").to_pylist() == list(labels)  # images only, in the order of the tar
    assert table.column("data").to_pylist() == [members[shards.split(u)[1]] for u in labels]
    assert table.column("image_id").to_pylist() == [sources.image_id(u) for u in labels]
    assert dict(shards.read_tar_members(paths[0], ["s00/0002.jpg", "s00/0000.cls", "nope.jpg"])) == {
        "s00/0002.jpg": members["s00/0002.jpg"],
        "s00/0000.cls": members["s00/0000.cls"],
    }

    path = str(tmp_path / "b.parquet")
    rows = write_parquet_bytes(path, 10, hf=True, row_group_size=4)
    images = pq.read_table(path).column("image").combine_chunks().field("bytes").to_pylist()
    group1 = pa.concat_tables(sources.read_parquet_images(path, 1, chunk_rows=3))
    assert group1.column("uri").to_pylist() == list(rows)[4:8]
    assert group1.column("data").to_pylist() == images[4:8]
    assert dict(shards.read_parquet_rows(path, [9, 0, 5, 42])) == {0: images[0], 5: images[5], 9: images[9]}
