"""The API's reads of the object store through an outage: a dataset whose manifest is on S3 (moto behind the
session's fault proxy), every request to its bucket answered 500 for longer than the client retries, then
the store back. The control plane is the real one on SQLite, with the in-memory Jobs API of
``tests/service/test_orchestrator.py`` standing in for Ray (what is tested is the API's answer)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi.testclient import TestClient

from api.app import create_app
from bench.s3proxy import Faults
from curation import storage
from curation.layout import Layout
from service.principals import Role
from service.states import JobKind
from tests import s3
from tests.service.test_orchestrator import World

READ = {"Authorization": "Bearer reader-token"}


def test_manifest_reads_answer_503_while_the_store_is_down_and_200_after(s3_proxy, tmp_path):
    world = World(tmp_path)
    world.control.principals.add("reader-token", Role.READ)
    [gid] = world.post()
    world.tick()
    world.finish(gid, JobKind.TEACHER)
    world.tick()
    world.finish(gid, JobKind.LABEL)
    # The label job's statistics name a manifest on S3.
    bucket = s3.new_bucket()
    manifest = f"{bucket}/ds/manifest"
    table = pa.table({"image_id": [1, 2, 3], "uri": ["a", "b", "c"], "label": [0, 1, 2], "confidence": [0.9] * 3})
    buffer = io.BytesIO()
    pq.write_table(table.append_column("copies", pa.array([1, 1, 1])), buffer)
    storage.write_bytes(manifest + "/part-0.parquet", buffer.getvalue())
    stats_uri = Layout(world.get(gid).output).stats
    stats = json.loads(storage.read_bytes(stats_uri)) | {"manifest_uri": manifest}
    storage.write_json(stats_uri, stats)
    world.tick()
    dataset_id = world.get(gid).dataset_id

    with TestClient(create_app(world.control)) as client:
        page = f"/datasets/{dataset_id}/manifest?offset=0&limit=10"
        assert client.get(page, headers=READ).status_code == 200
        s3_proxy.reset(Faults(internal=1.0, paths_with=bucket.removeprefix("s3://")))
        try:
            r = client.get(page, headers=READ)
            assert r.status_code == 503 and "object store" in r.json()["detail"], r.text
            assert r.headers["Retry-After"] == "5"
        finally:
            s3_proxy.reset()
        r = client.get(page, headers=READ)
        assert r.status_code == 200 and [row["image_id"] for row in r.json()["data"]] == [1, 2, 3]
    world.store.close()
