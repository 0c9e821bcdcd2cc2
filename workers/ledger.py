"""Resuming a labeling job: the source split into fixed shards, and a ledger of the output files committed.

The unlabeled manifest is cut into shards of ``shard_rows`` consecutive rows inside each row group (the last
shard of a row group may be shorter), numbered in order; the same manifest always gives the same shards. Each
write task of the labeling job writes its predictions and rejects files under ``_staging/``, moves them into
``predictions/`` and ``rejects/``, and then writes one ledger entry: ``ledger/<name>.json`` with the rows it
wrote per shard and its counts. The ledger entry is the commit: a file that no entry names is left over from
a killed task and is deleted before the job goes on.

A shard whose committed rows equal its size is finished and is not read again. A shard with some rows
committed (its rows were in flight when the job died) is read again without the image ids already written,
which are read back from the few committed files that hold rows of such shards. So a killed job, run again,
labels every row exactly once, and memory depends on the rows in flight, not on the size of the source.

WebDataset and parquet-bytes sources are read in their own units: a shard is one tar file (``TarPlan``,
streamed once, from start to end, by one read task) or one Parquet row group (``ShardPlan.per_row_group``).
How many images a tar shard holds is known only once it has been streamed: the read task then writes
``shard-sizes/<shard>.json``, a fact about the source rather than a commit; until it exists the shard counts
as not finished, and is read again less the ids already committed. The tar files of a folder are listed once
into ``source-shards.parquet``.

``labeling-run.json`` records what the outputs were made from (source, format, teacher, top-k, shard size). A
run with anything different clears the folder first, so outputs of two different runs never mix.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation import sources, storage
from curation.layout import (
    LEDGER,
    PREDICTIONS,
    REJECTS,
    RESULT,
    RUN_RECORD,
    SHARD_SIZES,
    SOURCE_MANIFEST,
    SOURCE_SHARDS,
    STAGING,
)
from trainer.meta import META, WEIGHTS

# Threads reading ledger entries and committed files' ids when a job resumes (small objects, I/O bound).
READ_THREADS = 16


@dataclass(frozen=True)
class ShardPlan:
    """The shards of an unlabeled manifest: fixed row ranges inside its row groups."""

    files: list[str]
    group_file: np.ndarray  # (G,) index into files
    group_index: np.ndarray  # (G,) row group index inside its file
    group_rows: np.ndarray  # (G,) rows
    group_first_shard: np.ndarray  # (G + 1,) first shard id of each row group; the last entry is the total
    shard_rows: int

    @classmethod
    def from_manifest(cls, uri: str, shard_rows: int) -> ShardPlan:
        groups = sources.row_groups(uri)
        files = list(dict.fromkeys(f for f, _, _ in groups))
        position = {f: i for i, f in enumerate(files)}
        rows = np.array([n for _, _, n in groups], dtype=np.int64)
        per_group = -(-rows // shard_rows)
        return cls(
            files=files,
            group_file=np.array([position[f] for f, _, _ in groups], dtype=np.int64),
            group_index=np.array([g for _, g, _ in groups], dtype=np.int64),
            group_rows=rows,
            group_first_shard=np.concatenate([[0], np.cumsum(per_group)]).astype(np.int64),
            shard_rows=shard_rows,
        )

    @classmethod
    def per_row_group(cls, uri: str) -> ShardPlan:
        """One shard per row group of a Parquet source (parquet-bytes: the row group is the read unit)."""
        return cls.from_manifest(uri, max([n for _, _, n in sources.row_groups(uri)], default=1) or 1)

    @property
    def num_shards(self) -> int:
        return int(self.group_first_shard[-1])

    @property
    def num_rows(self) -> int:
        return int(self.group_rows.sum())

    def sizes(self) -> np.ndarray:
        """Rows of every shard."""
        sizes = np.full(self.num_shards, self.shard_rows, dtype=np.int64)
        first, last = self.group_first_shard[:-1], self.group_first_shard[1:] - 1
        nonempty = self.group_rows > 0  # an empty row group has no shard
        sizes[last[nonempty]] = (self.group_rows - (last - first) * self.shard_rows)[nonempty]
        return sizes

    def locate(self, shard: int, stop_shard: int | None = None) -> tuple[str, int, int, int]:
        """(file URI, row group, start row, stop row) of a shard, or of the shards ``[shard, stop_shard)``,
        which must lie in one row group."""
        g = int(np.searchsorted(self.group_first_shard, shard, side="right")) - 1
        first = int(self.group_first_shard[g])
        stop_shard = shard + 1 if stop_shard is None else stop_shard
        if stop_shard > self.group_first_shard[g + 1]:
            raise ValueError(f"shards {shard}..{stop_shard} span row groups")
        start = (shard - first) * self.shard_rows
        stop = min((stop_shard - first) * self.shard_rows, int(self.group_rows[g]))
        return self.files[int(self.group_file[g])], int(self.group_index[g]), start, stop

    def units(self, rows: int, todo: np.ndarray) -> np.ndarray:
        """Read units: (first shard, stop shard) pairs of at most ``rows`` rows (whole shards, at least one),
        never across a row group, that hold a shard where ``todo`` (a bool per shard) is set."""
        per_unit = max(1, rows // self.shard_rows)
        starts = [np.arange(a, b, per_unit) for a, b in zip(self.group_first_shard[:-1], self.group_first_shard[1:])]
        first = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        group_end = np.repeat(self.group_first_shard[1:], [len(s) for s in starts])
        stop = np.minimum(first + per_unit, group_end)
        pending = np.add.reduceat(todo.astype(np.int64), first) > 0 if first.size else np.zeros(0, dtype=bool)
        return np.stack([first, stop], axis=1)[pending].astype(np.int64)


@dataclass(frozen=True)
class TarPlan:
    """The shards of a WebDataset source: one per tar file, in the order listed. Their sizes are unknown (-1)
    until a read task has streamed them (``record_size``)."""

    files: list[str]

    @classmethod
    def listed(cls, source_uri: str, out_uri: str) -> TarPlan:
        """The tar shards of ``source_uri``, listed once into ``<out>/source-shards.parquet`` (a resumed run
        reads that list and never lists again, so shard numbers stay the same)."""
        listed = storage.join(out_uri, SOURCE_SHARDS)
        if not storage.exists(listed):
            files = sources.container_files(source_uri, sources.SourceFormat.WEBDATASET)
            fs, path = storage.resolve(listed)
            fs.create_dir(posixpath.dirname(path), recursive=True)
            pq.write_table(pa.table({"uri": pa.array(files, pa.string())}), path + ".tmp", filesystem=fs)
            fs.move(path + ".tmp", path)
        fs, path = storage.resolve(listed)
        return cls(files=pq.read_table(path, filesystem=fs).column("uri").to_pylist())

    @property
    def num_shards(self) -> int:
        return len(self.files)

    @property
    def num_rows(self) -> int | None:
        return None  # known only once every shard has been streamed

    def sizes(self) -> np.ndarray:
        return np.full(self.num_shards, -1, dtype=np.int64)

    def units(self, rows: int, todo: np.ndarray) -> np.ndarray:
        """Read units: one per tar shard where ``todo`` is set, as (shard, shard + 1); ``rows`` is not used
        (a shard is streamed whole, by one task)."""
        shards = np.nonzero(todo)[0].astype(np.int64)
        return np.stack([shards, shards + 1], axis=1)


Plan = ShardPlan | TarPlan


def record_size(out_uri: str, shard: int, images: int) -> None:
    """What a read task learned by streaming a tar shard to its end: the images it holds."""
    storage.write_json(storage.join(out_uri, SHARD_SIZES, f"{shard:09d}.json"), {"shard": shard, "images": images})


@dataclass
class LedgerState:
    """What earlier runs committed."""

    done: np.ndarray  # (shards,) rows committed per shard
    sizes: np.ndarray  # (shards,) rows per shard; -1 where not known yet (a tar shard never streamed to its end)
    counts: Counter = field(default_factory=Counter)  # predicted, rejected:<reason>
    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return int(self.done.sum())


def fingerprint(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=12).hexdigest()


def source_version(source_uri: str, fmt: sources.SourceFormat | None = None) -> str:
    """A manifest's (or Parquet or tar source file's) files, sizes and modification times; a folder is listed
    once, so its URI is enough."""
    fmt = fmt or (sources.SourceFormat.MANIFEST if sources.is_manifest(source_uri) else sources.SourceFormat.FILES)
    if fmt is sources.SourceFormat.FILES:
        return ""
    if fmt is sources.SourceFormat.WEBDATASET:
        fs, path = storage.resolve(source_uri)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return ""
        files = [source_uri]
    else:
        files = sources.manifest_files(source_uri)
    infos = []
    for uri in files:
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
        infos.append([uri, info.size, info.mtime_ns])
    return fingerprint(infos)


def model_version(model_uri: str) -> str:
    """model.json (architecture, classes, metrics, training config) and the size of the weights."""
    fs, path = storage.resolve(storage.join(model_uri, WEIGHTS))
    return fingerprint(storage.read_bytes(storage.join(model_uri, META)).decode(), fs.get_file_info(path).size)


def open_run(out_uri: str, run: dict[str, Any], *, restart: bool = False) -> bool:
    """Make ``out_uri`` ready for ``run``: True when it holds outputs of the same run to resume from; otherwise
    (or with ``restart``) every output there is deleted first."""
    record = storage.join(out_uri, RUN_RECORD)
    if not restart and storage.exists(record) and storage.read_json(record) == run:
        return True
    for part in (PREDICTIONS, REJECTS, LEDGER, STAGING, SHARD_SIZES):
        storage.delete_dir_contents(storage.join(out_uri, part))
    for name in (SOURCE_MANIFEST, SOURCE_SHARDS, RESULT):
        storage.delete_file(storage.join(out_uri, name))
    storage.write_json(record, run)
    return False


def commit(
    out_uri: str, name: str, shards: dict[int, int], counts: dict[str, int], staged: dict[str, str | None]
) -> None:
    """Move a write task's staged files into place, then write its ledger entry (the commit point)."""
    files = {}
    for part, uri in staged.items():
        if uri is not None:
            storage.move(uri, storage.join(out_uri, part, posixpath.basename(uri)))
            files[part] = posixpath.basename(uri)
    entry = {
        "name": name,
        "shards": sorted([int(s), int(n)] for s, n in shards.items()),
        "counts": counts,
        "files": files,
    }
    storage.write_bytes(storage.join(out_uri, LEDGER, f"{name}.json"), json.dumps(entry).encode())


def load(out_uri: str, plan: Plan) -> LedgerState:
    """Read the ledger, delete files that no entry commits (staged or left by a killed task), and sum what is
    committed per shard; read the tar shard sizes that read tasks recorded."""
    uris = storage.list_files(storage.join(out_uri, LEDGER), suffix=".json")
    size_uris = storage.list_files(storage.join(out_uri, SHARD_SIZES), suffix=".json")
    with ThreadPoolExecutor(READ_THREADS) as pool:
        entries = list(pool.map(storage.read_json, uris))
        recorded = list(pool.map(storage.read_json, size_uris))
    sizes = plan.sizes()
    for r in recorded:
        if r["shard"] < plan.num_shards:
            sizes[r["shard"]] = r["images"]
    done = np.zeros(plan.num_shards, dtype=np.int64)
    counts: Counter = Counter()
    committed: dict[str, set[str]] = {part: set() for part in (PREDICTIONS, REJECTS)}
    for entry in entries:
        for shard, rows in entry["shards"]:
            if shard >= plan.num_shards:
                raise ValueError(f"{out_uri}: ledger entry {entry['name']} names shard {shard} of {plan.num_shards}")
            done[shard] += rows
        counts.update(entry["counts"])
        for part, name in entry["files"].items():
            committed[part].add(name)
    over = np.nonzero((sizes >= 0) & (done > sizes))[0]
    if over.size:
        raise ValueError(f"{out_uri}: the ledger has more rows than the source for shards {over[:5].tolist()}")
    storage.delete_dir_contents(storage.join(out_uri, STAGING))
    for part, names in committed.items():
        for uri in storage.list_files(storage.join(out_uri, part)):
            if posixpath.basename(uri) not in names:
                storage.delete_file(uri)
    return LedgerState(done=done, sizes=sizes, counts=counts, entries=entries)


def written_ids(out_uri: str, state: LedgerState, shards: np.ndarray) -> np.ndarray:
    """Sorted image ids in the committed files that hold rows of ``shards`` (the partly finished ones)."""
    wanted = set(shards.tolist())
    uris = [
        storage.join(out_uri, part, name)
        for entry in state.entries
        if any(s in wanted for s, _ in entry["shards"])
        for part, name in entry["files"].items()
    ]

    def ids(uri: str) -> np.ndarray:
        fs, path = storage.resolve(uri)
        return pq.read_table(path, filesystem=fs, columns=["image_id"]).column("image_id").to_numpy()

    with ThreadPoolExecutor(READ_THREADS) as pool:
        parts = list(pool.map(ids, uris))
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
