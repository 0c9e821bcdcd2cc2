"""Training reads images inside containers a container at a time: each tar shard is opened once per pass
(opens counted by the kernel, in every Ray worker), streamed start to end, and yields the right images."""

import hashlib
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import imaging
from tests.containers import webdataset_members, write_parquet_bytes, write_webdataset
from tests.helpers import image_bytes
from tests.opens import OpenCounter
from trainer import data, noise
from trainer.config import NoiseConfig, TrainConfig

SIZE = 16


def expected_pixels(blob: bytes) -> np.ndarray:
    return imaging.to_array(imaging.resize_square(imaging.decode_rgb(blob), SIZE, 1.0))


def digest(pixels: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=8).hexdigest()


def test_load_pixels_reads_each_container_once(tmp_path):
    paths, _, _ = write_webdataset(str(tmp_path / "wds"), 2, 4)
    members = [dict(webdataset_members(s, 4)[0]) for s in range(2)]
    parquet = str(tmp_path / "b.parquet")
    write_parquet_bytes(parquet, 6, hf=True, row_group_size=2)
    images = pq.read_table(parquet).column("image").combine_chunks().field("bytes").to_pylist()
    plain = str(tmp_path / "plain.png")
    with open(plain, "wb") as f:
        f.write(image_bytes(np.random.default_rng(5), "PNG", (20, 20), "RGB"))

    uris = [
        f"{paths[0]}#s00/0001.jpg",
        plain,
        f"{paths[1]}#s01/0002.jpg",
        f"{paths[0]}#s00/0000.png",
        f"{parquet}#4",
        f"{paths[0]}#s00/0001.jpg",  # the same member twice (copies): read once
        f"{paths[1]}#s01/9999.jpg",  # a member the shard does not hold: skipped
        f"{tmp_path}/gone.tar#a.jpg",  # a shard that is not there: its rows skipped
        f"{parquet}#1",
    ]
    want = {
        0: members[0]["s00/0001.jpg"],
        1: open(plain, "rb").read(),
        2: members[1]["s01/0002.jpg"],
        3: members[0]["s00/0000.png"],
        4: images[4],
        5: members[0]["s00/0001.jpg"],
        8: images[1],
    }
    batch = {"uri": np.array(uris, dtype=object), "label": np.arange(len(uris))}
    with OpenCounter([*paths, parquet, plain]) as opens:
        out = noise.load_pixels(batch, size=SIZE, crop_pct=1.0, noise=None, mean=(0.5, 0.5, 0.5))
        assert opens.counts() == Counter({paths[0]: 1, paths[1]: 1, parquet: 1, plain: 1})
    assert out["label"].tolist() == list(range(len(uris)))  # every row, in order; unusable ones marked
    kept = out[noise.SKIP] == noise.KEPT
    assert np.nonzero(~kept)[0].tolist() == [6, 7]
    assert noise.skipped_counts(out[noise.SKIP]) == {"missing": 2}
    for label in want:
        assert np.array_equal(out["pixels"][label], expected_pixels(want[label]))
    # in pieces, with noise: the same rows, each container still opened once
    with OpenCounter([*paths, parquet]) as opens:
        pieces = list(
            noise.iter_pixels(batch, size=SIZE, crop_pct=1.0, noise=NoiseConfig(), mean=(0.5, 0.5, 0.5), chunk_rows=4)
        )
        assert opens.counts() == Counter({paths[0]: 1, paths[1]: 1, parquet: 1})
    assert [len(p["label"]) for p in pieces] == [4, 4, 1]
    assert sorted(np.concatenate([p["label"] for p in pieces]).tolist()) == list(range(len(uris)))


def test_training_stream_reads_each_shard_once_per_pass(ray_cluster, tmp_path):
    """Through Ray Data: rows grouped by shard, one read of each shard per pass. (Parquet files of image bytes
    take the same grouping; their reading is checked above.)"""
    containers, labels, _ = write_webdataset(str(tmp_path / "wds"), 3, 5)
    blobs = {}
    for s, path in enumerate(containers):
        blobs |= {f"{path}#{name}": blob for name, blob in webdataset_members(s, 5)[0]}
    uris = list(labels)[::-1]  # not in container order: the stream groups them
    copies = [1 + i % 3 for i in range(len(uris))]
    manifest = pa.table(
        {"uri": uris, "label": pa.array([labels[u] for u in uris], pa.int32()), "copies": pa.array(copies, pa.int32())}
    )
    assert data.names_members(manifest.column("uri"))
    config = TrainConfig(architecture="test_resnet", input_size=SIZE, noise=NoiseConfig(randaugment_ops=1))
    rows = sum(copies)

    with OpenCounter(containers) as opens:
        # two passes over the rows (rows_needed > rows): each shard read once per pass
        ds = data.stream(ray_cluster.data.from_arrow(manifest), rows, rows + 1, config, 3, seed=0, by_container=True)
        out = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        assert opens.counts() == Counter({c: 2 for c in containers})
        labels_out = np.concatenate([b["label"] for b in out])
        assert len(labels_out) == 2 * rows
        assert (np.concatenate([b[noise.SKIP] for b in out]) == noise.KEPT).all()
        assert Counter(labels_out.tolist()) == Counter(2 * [labels[u] for u, c in zip(uris, copies) for _ in range(c)])
        assert all(b["pixels"].shape[1:] == (SIZE, SIZE, 3) and b["target"].shape[1] == 3 for b in out)

        # evaluation: one pass, un-noised, every image as it is
        ev = data.evaluation(
            ray_cluster.data.from_arrow(manifest.drop_columns(["copies"])), config, 3, by_container=True
        )
        got = Counter()
        for b in ev.iter_batches(batch_size=None, batch_format="numpy"):
            got.update((int(label), digest(p)) for label, p in zip(b["label"], b["pixels"]))
        assert opens.counts() == Counter({c: 3 for c in containers})
    assert got == Counter((labels[u], digest(expected_pixels(blobs[u]))) for u in uris)


def test_manifest_names_members(tmp_path):
    pq.write_table(pa.table({"uri": ["s3://b/p/0001.tar#k.jpg"]}), str(tmp_path / "m.parquet"))
    pq.write_table(pa.table({"uri": ["/d/photo#1.jpg", "/d/x.png"]}), str(tmp_path / "f.parquet"))
    assert data.manifest_names_members(str(tmp_path / "m.parquet"))
    assert not data.manifest_names_members(str(tmp_path / "f.parquet"))
    assert not data.names_members(pa.array([], pa.string()))
    assert os.path.exists(tmp_path / "m.parquet")
