"""Labeling WebDataset tar shards and Parquet files of image bytes through the real job, locally and on S3:
every image exactly once in the predictions or the rejects under its ``<container>#<member>`` URI, and a job
run again after a partial run reads only the shards it had not finished."""

import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import sources, storage
from tests import s3
from tests.containers import write_parquet_bytes, write_webdataset
from tests.helpers import untrained_model
from workers import ledger
from workers.labeling import LabelConfig, label


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("teacher") / "model")
    untrained_model(uri)
    return uri


def outputs(out: str) -> tuple[Counter, dict[str, str]]:
    """How many times each URI is in the predictions or the rejects, and the rejects' reasons."""
    seen: Counter = Counter()
    reasons = {}
    for part in (ledger.PREDICTIONS, ledger.REJECTS):
        for uri in storage.list_files(storage.join(out, part), suffix=".parquet"):
            fs, path = storage.resolve(uri)
            table = pq.read_table(path, filesystem=fs)
            assert table.column("image_id").to_pylist() == [
                sources.image_id(u) for u in table.column("uri").to_pylist()
            ]
            seen.update(table.column("uri").to_pylist())
            if part == ledger.REJECTS:
                reasons.update(zip(table.column("uri").to_pylist(), table.column("reason").to_pylist()))
    return seen, reasons


def test_webdataset_members_labeled_once_and_resumed_per_shard(ray_cluster, tmp_path, teacher):
    folder = str(tmp_path / "wds")
    paths, labels, bad = write_webdataset(folder, 4, 6, corrupt={1: (2,)})
    out = str(tmp_path / "labels")
    config = LabelConfig(top_k=2, batch_size=4, rows_per_file=4)
    first = label(folder, teacher, out, config, teacher_id="t", source_format="webdataset")
    seen, reasons = outputs(out)
    assert seen == Counter(list(labels))  # every image member once; .cls and .json members are not images
    assert reasons == {bad[0]: "corrupt"} and bad[0].endswith("pool-000001.tar#s01/0002.jpg")
    assert (first.images, first.predicted, first.rejected, first.resumed) == (24, 23, {"corrupt": 1}, 0)
    assert sorted(
        storage.read_json(u)["images"] for u in storage.list_files(storage.join(out, ledger.SHARD_SIZES))
    ) == [6, 6, 6, 6]

    # A partial run, as a killed job leaves it: nothing of shard 2 was committed (its size was recorded: it had
    # been streamed), half of shard 3 was, and shard 3's read task died before recording its size. Shards 0 and
    # 1 are finished: they must not be read again, and are overwritten with bytes that are no tar at all (a
    # folder source is listed once, so the run goes on; reading them again would fail it).
    plan = ledger.TarPlan.listed(folder, out)
    shard3 = [u for u in labels if "pool-000003.tar#" in u]
    uncommit(out, plan, {u for u in labels if "pool-000002.tar#" in u} | set(shard3[:3]))
    storage.delete_file(storage.join(out, ledger.SHARD_SIZES, f"{3:09d}.json"))
    state = ledger.load(out, plan)
    assert state.done.tolist() == [6, 6, 0, 3] and state.sizes.tolist() == [6, 6, 6, -1]
    for s in (0, 1):
        with open(plan.files[s], "wb") as f:
            f.write(b"not a tar: reading this shard again fails the job")

    again = label(folder, teacher, out, config, teacher_id="t", source_format="webdataset")
    seen, reasons = outputs(out)
    assert seen == Counter(list(labels)) and reasons == {bad[0]: "corrupt"}
    assert (again.images, again.predicted, again.rejected, again.resumed) == (24, 23, {"corrupt": 1}, 15)
    state = ledger.load(out, plan)
    assert state.sizes.tolist() == [6, 6, 6, 6] and state.done.tolist() == [6, 6, 6, 6]
    # with everything committed, a third run reads nothing (shards 0 and 1 would fail it)
    assert label(folder, teacher, out, config, teacher_id="t", source_format="webdataset").resumed == 24


def uncommit(out: str, plan: ledger.TarPlan, uris: set[str]) -> None:
    """Take ``uris`` out of the committed files and their ledger entries, as if they had never been written."""
    shard_of = {f: i for i, f in enumerate(plan.files)}
    for entry_uri in storage.list_files(storage.join(out, ledger.LEDGER)):
        entry = storage.read_json(entry_uri)
        shards, counts = Counter(), Counter()
        for part, name in entry["files"].items():
            path = storage.join(out, part, name)
            table = pq.read_table(path)
            table = table.filter(pa.array([u not in uris for u in table.column("uri").to_pylist()], pa.bool_()))
            pq.write_table(table, path)
            shards.update(shard_of[u.split("#")[0]] for u in table.column("uri").to_pylist())
            if part == ledger.PREDICTIONS:
                counts["predicted"] += table.num_rows
            else:
                counts.update(f"rejected:{r}" for r in table.column("reason").to_pylist())
        entry["shards"] = sorted([s, n] for s, n in shards.items())
        entry["counts"] = dict(counts)
        storage.write_json(entry_uri, entry)


def test_containers_on_s3(ray_cluster, tmp_path, teacher):
    """A single tar shard (format inferred from .tar) and a prefix of parquet-bytes files, plain binary and
    Hugging Face structs, on S3."""
    local = str(tmp_path / "src")
    _, labels, bad = write_webdataset(os.path.join(local, "wds"), 1, 5, corrupt={0: (4,)})
    rows = write_parquet_bytes(os.path.join(local, "pq", "hf.parquet"), 7, hf=True, row_group_size=3, corrupt=(5,))
    rows |= write_parquet_bytes(os.path.join(local, "pq", "plain.parquet"), 4, hf=False, row_group_size=4, seed=3)
    bucket = s3.new_bucket()
    s3.upload_folder(local, bucket + "/src")
    moved = lambda uris: [u.replace(local, bucket + "/src") for u in uris]  # noqa: E731

    shard = bucket + "/src/wds/pool-000000.tar"
    result = label(shard, teacher, bucket + "/labels-wds", LabelConfig(top_k=2, batch_size=4))
    seen, reasons = outputs(bucket + "/labels-wds")
    assert seen == Counter(moved(list(labels))) and reasons == {moved(bad)[0]: "corrupt"}
    assert (result.images, result.predicted) == (5, 4)

    out = bucket + "/labels-pq"
    result = label(
        bucket + "/src/pq",
        teacher,
        out,
        LabelConfig(top_k=2, batch_size=4),
        source_format=sources.SourceFormat.PARQUET_BYTES,
    )
    seen, reasons = outputs(out)
    assert seen == Counter(moved(list(rows)))  # <file>#<row index in the file>
    assert reasons == {moved(list(rows))[5]: "corrupt"} and moved(list(rows))[5].endswith("hf.parquet#5")
    assert (result.images, result.predicted) == (11, 10)
    # one shard per row group, committed as such: a run again finds them all finished
    plan = ledger.ShardPlan.per_row_group(bucket + "/src/pq")
    assert plan.sizes().tolist() == [3, 3, 1, 4]
    assert ledger.load(out, plan).done.tolist() == [3, 3, 1, 4]
    again = label(bucket + "/src/pq", teacher, out, LabelConfig(top_k=2, batch_size=4), source_format="parquet-bytes")
    assert again.resumed == 11 and outputs(out)[0] == Counter(moved(list(rows)))


def test_decoding_uses_carried_bytes(tmp_path):
    """Rows with a ``data`` column are decoded from it; their URI is never fetched."""
    from tests.helpers import image_bytes
    from workers.labeling import read_and_decode

    good = image_bytes(np.random.default_rng(0), "PNG", (30, 30), "RGB")
    batch = {
        "image_id": np.arange(3),
        "uri": np.array(["s3://nowhere/x.tar#a.png"] * 3, dtype=object),
        "data": np.array([good, b"", good[:60]], dtype=object),
    }
    out = read_and_decode(batch, size=16, crop_pct=1.0)
    assert out["reason"].tolist() == ["", "empty", "corrupt"]
    assert out["pixels"][0].any()
