"""Parquet files read by the project's own Ray Data tasks: one task per read unit of whole files, each streaming
its files in tables of about BATCH_ROWS rows; and a streaming repartition whose tasks reserve what they are told.

Used instead of ``ray.data.read_parquet``, whose Ray 2.60 reader first reads every footer on a pool of up to 32
actors (a new process each, even on a 2-CPU node, and seconds of start-up before the first row) and bin-packs
row groups into 128 MiB blocks, which on a small node doubles the peak memory (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from curation import storage

log = logging.getLogger(__name__)

# On-disk bytes of Parquet read by one task (whole files): a few hundred tasks for hundreds of millions of rows.
READ_UNIT_BYTES = 32 << 20
# Rows a task holds and transforms at a time (about 6 MB of predictions), whatever the files' row groups.
BATCH_ROWS = 65_536


def read_units(uri: str) -> list[list[str]]:
    """The ``*.parquet`` files under ``uri`` (or the file itself), in order, grouped into read units of about
    READ_UNIT_BYTES; none for a folder with no Parquet file."""
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        infos = sorted(
            (i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File and i.path.endswith(".parquet")),
            key=lambda i: i.path,
        )
    prefix = uri.split("://", 1)[0] + "://" if storage.is_remote(uri) else ""
    units: list[list[str]] = []
    size = READ_UNIT_BYTES
    for i in infos:
        if size + (i.size or 0) > READ_UNIT_BYTES and (not units or units[-1]):
            units.append([])
            size = 0
        units[-1].append(prefix + i.path)
        size += i.size or 0
    return units


def tables(files: list[str], columns: list[str] | None) -> Iterator[pa.Table]:
    """The rows of ``files`` in tables of about BATCH_ROWS rows (small row groups are gathered). A store that
    still fails after its client's retries raises ``storage.StorageUnavailable``: the task's to run again."""
    parts, rows = [], 0
    for uri in files:
        fs, path = storage.resolve(uri)
        with storage.store_errors(uri), fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=columns):
                parts.append(batch)
                rows += batch.num_rows
                if rows >= BATCH_ROWS:
                    yield pa.Table.from_batches(parts)
                    parts, rows = [], 0
    if parts:
        yield pa.Table.from_batches(parts)


def over_units(
    units: list[list[str]], fn: Callable[..., Iterator[pa.Table]], *, num_cpus: float = 1, **fn_kwargs: Any
) -> ray.data.Dataset:
    """One task per read unit (``num_cpus`` each), calling ``fn(files_of_the_unit, **fn_kwargs)``. A task that
    raises ``storage.StorageUnavailable`` runs again (``storage.retry_on_store``)."""

    def call(batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for i in batch["id"]:
            yield from fn(units[int(i)], **fn_kwargs)

    return storage.retry_on_store(
        ray.data.range(len(units), override_num_blocks=len(units)).map_batches(
            call, batch_size=1, batch_format="numpy", num_cpus=num_cpus
        )
    )


def read(uri: str, columns: list[str], *, num_cpus: float = 1) -> ray.data.Dataset:
    """The ``columns`` of the Parquet files under ``uri`` (at least one), read by one task per read unit."""
    units = read_units(uri)
    if not units:
        raise FileNotFoundError(f"no Parquet file under {uri}")
    return over_units(units, tables, num_cpus=num_cpus, columns=columns)


def repartition(ds: ray.data.Dataset, rows: int, *, num_cpus: float) -> ray.data.Dataset:
    """``ds`` cut into blocks of ``rows`` rows as they stream (fused into the stage before it), so that the next
    stage runs one task per block, in parallel, each handing its output on when it ends. Its tasks reserve
    ``num_cpus``: Ray Data 2.60's ``repartition`` takes no resource arguments, and would reserve a whole CPU."""
    from ray.data._internal.logical.operators.map_operator import StreamingRepartition

    out = ds.repartition(target_num_rows_per_block=rows)
    op = getattr(getattr(out, "_logical_plan", None), "dag", None)
    if isinstance(op, StreamingRepartition):
        op.ray_remote_args["num_cpus"] = num_cpus
    else:  # a Ray Data that plans repartition differently: its default reservation applies
        log.warning("cannot size the repartition stage's tasks (%s)", type(op).__name__)
    return out
