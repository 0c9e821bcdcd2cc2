"""Small real containers for the tests: WebDataset tar shards and Parquet files of image bytes."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench._common import tar_bytes
from tests.helpers import image_bytes

CLASSES = ["cat", "dog", "eel"]


def webdataset_members(
    shard: int, per_shard: int, *, seed: int = 0, corrupt: tuple[int, ...] = (), names: bool = False
) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    """The members of one shard: ``key.jpg`` (or ``.png``) + ``key.cls`` per sample, and one ``key.json`` that
    is metadata; samples at ``corrupt`` positions have a truncated JPEG. Returns the members and
    {image member name: class index}."""
    rng = np.random.default_rng(seed * 1000 + shard)
    members, labels = [], {}
    for i in range(per_shard):
        key = f"s{shard:02d}/{i:04d}"
        label = int(rng.integers(len(CLASSES)))
        ext, fmt = ("png", "PNG") if i % 3 == 0 else ("jpg", "JPEG")
        data = image_bytes(rng, fmt, (24 + i % 5, 20), "RGB")
        if i in corrupt:
            ext, data = "jpg", image_bytes(rng, "JPEG", (64, 64), "RGB")[:300]
        members.append((f"{key}.{ext}", data))
        members.append((f"{key}.cls", (CLASSES[label] if names else str(label)).encode()))
        if i == 0:
            members.append((f"{key}.json", json.dumps({"source": "test"}).encode()))
        labels[f"{key}.{ext}"] = label
    return members, labels


def write_webdataset(
    folder: str,
    shards: int,
    per_shard: int,
    *,
    corrupt: dict[int, tuple[int, ...]] | None = None,
    names: bool = False,
    seed: int = 0,
) -> tuple[list[str], dict[str, int], list[str]]:
    """``shards`` tar files ``pool-000000.tar``, ... under ``folder``. Returns the shard paths,
    {image member URI: class index} and the URIs of the corrupt members."""
    os.makedirs(folder, exist_ok=True)
    paths, labels, bad = [], {}, []
    for s in range(shards):
        members, shard_labels = webdataset_members(
            s, per_shard, seed=seed, corrupt=(corrupt or {}).get(s, ()), names=names
        )
        path = os.path.join(folder, f"pool-{s:06d}.tar")
        with open(path, "wb") as f:
            f.write(tar_bytes(members))
        paths.append(path)
        labels.update({f"{path}#{name}": label for name, label in shard_labels.items()})
        bad += [f"{path}#s{s:02d}/{i:04d}.jpg" for i in (corrupt or {}).get(s, ())]
    return paths, labels, bad


def write_parquet_bytes(
    path: str, rows: int, *, hf: bool, row_group_size: int = 4, seed: int = 0, corrupt: tuple[int, ...] = ()
) -> dict[str, int]:
    """A Parquet file with ``image`` (plain binary, or with ``hf`` Hugging Face's {bytes, path} struct and its
    ClassLabel metadata naming CLASSES) and ``label`` (int64 with ``hf``, else class name strings). Returns
    {row URI: class index}."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(CLASSES), size=rows)
    images = []
    for i in range(rows):
        data = image_bytes(rng, "PNG", (20 + i % 7, 24), "L")
        images.append(data[:100] if i in corrupt else data)
    if hf:
        image = pa.StructArray.from_arrays(
            [pa.array(images, pa.binary()), pa.array([f"{i:05d}.png" for i in range(rows)], pa.string())],
            names=["bytes", "path"],
        )
        label = pa.array(labels, pa.int64())
        features = {"image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"}}
        metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    else:
        image = pa.array(images, pa.binary())
        label = pa.array([CLASSES[v] for v in labels], pa.string())
        metadata = None
    table = pa.table({"image": image, "label": label}).replace_schema_metadata(metadata)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return {f"{path}#{i}": int(v) for i, v in enumerate(labels)}
