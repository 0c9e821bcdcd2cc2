"""Ray Data streams for training: labeled and pseudo-labeled rows, decoded and noised in CPU tasks.

Rows whose URIs name images inside containers (WebDataset tar shards, Parquet files of image bytes:
``curation.shards``) are grouped by container and pass before they are read (``by_container``): one task
reads all the rows of a container for one pass over the data, copies included, with one pass over the
container. So each tar shard is streamed once per pass, never read at random. The (pass, container) groups
come in an order drawn from the seed, so passes interleave rather than one container's passes coming in a
row; the rows of a group come out together, and the training workers' local shuffle buffer mixes them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from curation import shards, sources, storage, tables
from trainer import noise as noise_lib
from trainer.config import TrainConfig

# Rows per decode/augment task batch.
PREPARE_BATCH_SIZE = 256
# CPUs reserved by each data task (scheduling only). With a CPU worker's default 0.5, the worker and its data
# tasks fit one CPU: a whole CPU per task (Ray's default) left them pending forever beside the worker.
DATA_CPUS = 0.25
# Most partitions of the shuffle that groups rows by container.
MAX_GROUP_PARTITIONS = 200
# The column that groups the rows of one container (a seeded hash of its URI: the order containers come in).
_GROUP = "__container_group"


def _expand(batch: pa.Table, *, times: int, seed: int) -> pa.Table:
    """Each row ``copies`` times (1 without the column), ``times`` passes over the block as epochs; within each
    pass the rows are in a random order of their own (seeded by ``seed`` and the block's first URI), so that an
    image's copies are spread over the pass instead of side by side."""
    n = batch.num_rows
    if n == 0:
        return batch.append_column(noise_lib.NOISE_SEED, pa.array([], pa.int64()))
    copies = batch.column("copies").to_numpy() if "copies" in batch.column_names else np.ones(n, np.int64)
    rows = np.repeat(np.arange(n), copies)
    rng = np.random.default_rng([seed, sources.image_id(str(batch.column("uri")[0])) & (2**63 - 1)])
    order = np.concatenate([rng.permutation(rows) for _ in range(times)])
    # Each row's noise is drawn from a seed of its own: the same seed, block and pass give the same noise,
    # whatever process decodes the row and in whatever order.
    return batch.take(pa.array(order)).append_column(
        noise_lib.NOISE_SEED, pa.array(rng.integers(0, 2**63, len(order), dtype=np.int64))
    )


def _targets(batch: pa.Table, *, config: TrainConfig, num_classes: int) -> dict[str, np.ndarray]:
    labels = batch.column("label").to_numpy().astype(np.int64)
    if config.soft_targets and "topk_probs" in batch.column_names:
        k = len(batch.column("topk_probs")[0])
        classes = batch.column("topk_classes").combine_chunks().flatten().to_numpy().reshape(-1, k)
        probs = batch.column("topk_probs").combine_chunks().flatten().to_numpy().reshape(-1, k)
        target = noise_lib.soft_targets(classes, probs, num_classes, config.temperature)
    else:
        target = noise_lib.hard_targets(labels, num_classes, config.label_smoothing)
    out = {"uri": batch.column("uri").to_numpy(zero_copy_only=False), "label": labels, "target": target}
    if noise_lib.NOISE_SEED in batch.column_names:
        out[noise_lib.NOISE_SEED] = batch.column(noise_lib.NOISE_SEED).to_numpy()
    return out


def _prepare(batch: pa.Table, *, config: TrainConfig, num_classes: int, noised: bool) -> dict[str, np.ndarray]:
    return noise_lib.load_pixels(
        _targets(batch, config=config, num_classes=num_classes),
        size=config.input_size,
        crop_pct=config.crop_pct,
        noise=config.noise if noised else None,
        mean=config.mean,
        decode=config.decode,
    )


def stream(
    ds: ray.data.Dataset,
    rows: int,
    rows_needed: int,
    config: TrainConfig,
    num_classes: int,
    *,
    seed: int,
    by_container: bool = False,
) -> ray.data.Dataset:
    """An endless-enough, noised stream of ``rows_needed`` rows over a dataset of ``rows`` (copies counted);
    ``by_container``: its URIs name images in containers, read a container at a time."""
    times = max(1, math.ceil(rows_needed / max(rows, 1)))
    if by_container:
        return _by_container(ds, seed=seed, times=times, config=config, num_classes=num_classes, noised=True)
    expanded = ds.randomize_block_order(seed=seed).map_batches(
        _expand,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"times": times, "seed": seed},
        num_cpus=DATA_CPUS,
    )
    return _decoded(expanded, config, num_classes, noised=True)


def evaluation(
    ds: ray.data.Dataset, config: TrainConfig, num_classes: int, *, by_container: bool = False
) -> ray.data.Dataset:
    if by_container:
        return _by_container(ds, seed=0, times=1, config=config, num_classes=num_classes, noised=False)
    return _decoded(ds, config, num_classes, noised=False)


def _decoded(ds: ray.data.Dataset, config: TrainConfig, num_classes: int, *, noised: bool) -> ray.data.Dataset:
    """``ds``'s rows decoded (and noised), handed on a batch of PREPARE_BATCH_SIZE at a time."""
    out = ds.map_batches(
        _prepare,
        batch_format="pyarrow",
        batch_size=PREPARE_BATCH_SIZE,
        fn_kwargs={"config": config, "num_classes": num_classes, "noised": noised},
        num_cpus=DATA_CPUS,
    )
    return _in_small_blocks(out, config, num_classes)


def _in_small_blocks(ds: ray.data.Dataset, config: TrainConfig, num_classes: int) -> ray.data.Dataset:
    """``ds`` with its decoding tasks handing on each PREPARE_BATCH_SIZE rows as they are made, and run again when
    the store fails them (``storage.retry_on_store``). By default a task holds its output until it makes 128 MiB:
    a read block's images all decoded before the first training step (seconds). One task still decodes a whole
    read block (or container); Ray Data's context is the dataset's own, and applies to every task of its
    execution."""
    row_bytes = config.input_size**2 * 3 + 4 * num_classes + 256  # pixels, target, URI and label
    ds.context.target_max_block_size = PREPARE_BATCH_SIZE * row_bytes
    return storage.retry_on_store(ds)


def read_manifest(uri: str, columns: list[str]) -> ray.data.Dataset:
    return tables.read(uri, columns, num_cpus=DATA_CPUS)


def names_members(uris: pa.Array | pa.ChunkedArray) -> bool:
    """Whether any of ``uris`` names an image inside a container (``<container>#<member>``)."""
    if len(uris) == 0:
        return False
    pattern = r"(?i)(\.tar|\.tar\.gz|\.tgz|\.parquet)#"
    return bool(pc.any(pc.match_substring_regex(uris.cast(pa.string()), pattern)).as_py())


def manifest_names_members(uri: str, sample_rows: int = 1024) -> bool:
    """Whether a manifest's URIs name images inside containers, from the first rows of its first file (a
    manifest comes from one source: its rows are all of one kind)."""
    files = sources.manifest_files(uri)
    if not files:
        return False
    fs, path = storage.resolve(files[0])
    with fs.open_input_file(path) as f:
        batch = next(pq.ParquetFile(f).iter_batches(batch_size=sample_rows, columns=["uri"]), None)
    return batch is not None and names_members(batch.column(0))


def _by_container(
    ds: ray.data.Dataset, *, seed: int, times: int, config: TrainConfig, num_classes: int, noised: bool
) -> ray.data.Dataset:
    # As many partitions as CPUs: the decoding after the shuffle runs a task per partition. Ray's default (200)
    # costs a small cluster more in shuffle tasks than the reading itself.
    partitions = max(1, min(MAX_GROUP_PARTITIONS, int(ray.cluster_resources().get("CPU", 1))))
    out = (
        ds.map_batches(_add_group, batch_format="pyarrow", fn_kwargs={"seed": seed, "times": times}, num_cpus=DATA_CPUS)
        .groupby(_GROUP, num_partitions=partitions)
        .map_groups(
            _prepare_group,
            batch_format="pyarrow",
            fn_kwargs={"config": config, "num_classes": num_classes, "noised": noised},
            num_cpus=DATA_CPUS,
        )
    )
    return _in_small_blocks(out, config, num_classes)


def _add_group(batch: pa.Table, *, seed: int, times: int) -> pa.Table:
    """Each row once per pass (``times`` passes), keyed by a seeded 64-bit hash of its pass and container (or
    of its URI, for a plain file)."""
    containers = []
    for uri in batch.column("uri").to_pylist():
        parts = shards.split(uri)
        containers.append(parts[0] if parts else uri)
    keys = [
        int.from_bytes(hashlib.blake2b(f"{seed}\0{p}\0{c}".encode(), digest_size=8).digest(), "little", signed=True)
        for p in range(times)
        for c in containers
    ]
    return pa.concat_tables([batch] * times).append_column(_GROUP, pa.array(keys, pa.int64()))


def _prepare_group(
    group: pa.Table, *, config: TrainConfig, num_classes: int, noised: bool
) -> Iterator[dict[str, np.ndarray]]:
    """The rows of one container in one pass (copies included), read with one pass over it, in pieces of
    PREPARE_BATCH_SIZE rows."""
    # Seeded by the group's key, which differs from pass to pass: each pass has its own order and noise.
    key = int(group.column(_GROUP)[0].as_py()) & (2**63 - 1)
    rows = _targets(_expand(group.drop_columns([_GROUP]), times=1, seed=key), config=config, num_classes=num_classes)
    yield from noise_lib.iter_pixels(
        rows,
        size=config.input_size,
        crop_pct=config.crop_pct,
        noise=config.noise if noised else None,
        mean=config.mean,
        chunk_rows=PREPARE_BATCH_SIZE,
        decode=config.decode,
    )
