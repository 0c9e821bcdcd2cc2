"""Image sources: an ImageFolder (``<root>/<class>/<file>``), a flat folder, or a Parquet manifest.

Every image gets a stable int64 ``image_id``: the first 8 bytes of BLAKE2b over its URI. The same file has
the same id in every run, so predictions, manifests and resumed jobs can be joined on it.
"""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from service import storage

# Rows per row group of a manifest written by ``index``: URIs held in memory while listing, and a read unit
# small enough that a labeling task reading one shard decodes little it does not need.
INDEX_ROW_GROUP_ROWS = 65_536

# An unlabeled manifest as ``index`` writes it; user manifests need only ``uri``.
UNLABELED_SCHEMA = pa.schema([("image_id", pa.int64()), ("uri", pa.string())])

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def image_id(uri: str) -> int:
    return int.from_bytes(hashlib.blake2b(uri.encode(), digest_size=8).digest(), "little", signed=True)


def image_ids(uris) -> np.ndarray:
    return np.fromiter((image_id(u) for u in uris), dtype=np.int64, count=len(uris))


def is_manifest(uri: str) -> bool:
    return uri.endswith(".parquet")


def list_folder(root: str) -> list[str]:
    """Every file under ``root``; files that are not images are listed too, so they are counted as rejects."""
    return [u for u in storage.list_files(root) if not posixpath.basename(u).startswith(".")]


def unlabeled_manifest(root: str) -> pa.Table:
    """(image_id, uri) for every file under a folder, in a stable order, in memory: for small folders only
    (``index`` streams any number of files into a manifest)."""
    uris = list_folder(root)
    return pa.table({"image_id": pa.array(image_ids(uris)), "uri": pa.array(uris, pa.string())})


def index(source_uri: str, out_uri: str, *, row_group_rows: int = INDEX_ROW_GROUP_ROWS) -> int:
    """List every file under a folder or S3 prefix once into a Parquet manifest of (image_id, uri).

    Returns the number of rows. Memory stays at one row group of URIs however many files there are: the listing
    is streamed page by page and written a row group at a time. The manifest is written under a temporary
    name and then moved into place, so a manifest that exists is complete. Hidden files are skipped; files that
    are not images are listed too, so that labeling counts them as rejects.
    """
    fs, path = storage.resolve(out_uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = path + ".tmp"
    rows = 0
    with pq.ParquetWriter(tmp, UNLABELED_SCHEMA, filesystem=fs, compression="zstd") as writer:
        chunk: list[str] = []
        for uri in storage.iter_files(source_uri):
            chunk.append(uri)
            if len(chunk) == row_group_rows:
                writer.write_table(_unlabeled_table(chunk), row_group_size=row_group_rows)
                rows, chunk = rows + len(chunk), []
        if chunk:
            writer.write_table(_unlabeled_table(chunk), row_group_size=row_group_rows)
            rows += len(chunk)
    fs.move(tmp, path)
    return rows


def _unlabeled_table(uris: list[str]) -> pa.Table:
    return pa.table({"image_id": pa.array(image_ids(uris)), "uri": pa.array(uris, pa.string())},
                    schema=UNLABELED_SCHEMA)


def manifest_files(uri: str) -> list[str]:
    """The Parquet files of a manifest: the file itself, or the ``*.parquet`` files of a folder, sorted."""
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"{uri}: no such manifest")
    return storage.list_files(uri, suffix=".parquet")


def row_groups(uri: str) -> list[tuple[str, int, int]]:
    """(file URI, row group index, rows) for every row group of a manifest, in order: footers only."""
    out = []
    for file_uri in manifest_files(uri):
        fs, path = storage.resolve(file_uri)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        out.extend((file_uri, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
    return out


def read_unlabeled(file_uri: str, row_group: int, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of one row group of an unlabeled manifest as (image_id, uri).

    Reads batch by batch and stops at ``stop``, so memory is one batch, not the row group. Ids are computed
    from the URIs where the manifest has no ``image_id`` column.
    """
    fs, path = storage.resolve(file_uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        columns = ["image_id", "uri"] if "image_id" in pf.schema_arrow.names else ["uri"]
        parts, offset = [], 0
        for batch in pf.iter_batches(batch_size=max(1, stop - start), row_groups=[row_group], columns=columns):
            lo, hi = max(start - offset, 0), min(stop - offset, batch.num_rows)
            if hi > lo:
                parts.append(batch.slice(lo, hi - lo))
            offset += batch.num_rows
            if offset >= stop:
                break
    if not parts:
        return UNLABELED_SCHEMA.empty_table()
    table = pa.Table.from_batches(parts, schema=parts[0].schema)
    uris = table.column("uri").cast(pa.string())
    ids = table.column("image_id").cast(pa.int64()) if "image_id" in table.column_names else pa.array(
        image_ids(uris.to_pylist()), pa.int64())
    return pa.table({"image_id": ids, "uri": uris}, schema=UNLABELED_SCHEMA)


def image_folder(root: str) -> tuple[pa.Table, list[str]]:
    """(image_id, uri, label) for an ImageFolder, and the class names (sorted sub-folder names)."""
    uris = [u for u in list_folder(root) if u.lower().endswith(IMAGE_EXTENSIONS)]
    base = root.rstrip("/")
    rel = [u[len(base) + 1:] for u in uris]
    names = sorted({r.split("/", 1)[0] for r in rel if "/" in r})
    if not names:
        raise ValueError(f"{root} is not an ImageFolder: expected <root>/<class>/<image> files")
    index = {n: i for i, n in enumerate(names)}
    keep = [i for i, r in enumerate(rel) if "/" in r]
    table = pa.table(
        {
            "image_id": pa.array(image_ids([uris[i] for i in keep])),
            "uri": pa.array([uris[i] for i in keep], pa.string()),
            "label": pa.array([index[rel[i].split("/", 1)[0]] for i in keep], pa.int32()),
        }
    )
    return table, names


def labeled_source(uri: str, class_names: list[str] | None = None) -> tuple[pa.Table, list[str]]:
    """A labeled source as (image_id, uri, label) and its class names.

    ``uri`` is an ImageFolder or a Parquet manifest with ``uri`` and ``label`` columns (class name strings,
    or integer indices when ``class_names`` is given). Passing ``class_names`` pins the label order, so an
    evaluation split is scored in the teacher's class order.
    """
    if is_manifest(uri):
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs, columns=["uri", "label"])
        labels = table.column("label")
        if pa.types.is_integer(labels.type):
            if class_names is None:
                raise ValueError(f"{uri}: integer labels need class names")
            names = class_names
            idx = labels.to_numpy().astype(np.int32)
        else:
            names = class_names or sorted(set(labels.to_pylist()))
            lookup = {n: i for i, n in enumerate(names)}
            unknown = set(labels.to_pylist()) - lookup.keys()
            if unknown:
                raise ValueError(f"{uri}: labels not among the classes: {sorted(unknown)[:5]}")
            idx = np.array([lookup[v] for v in labels.to_pylist()], dtype=np.int32)
        uris = table.column("uri").to_pylist()
        table = pa.table({"image_id": pa.array(image_ids(uris)), "uri": pa.array(uris, pa.string()),
                          "label": pa.array(idx, pa.int32())})
    else:
        table, names = image_folder(uri)
        if class_names is not None:
            if set(names) - set(class_names):
                raise ValueError(f"{uri}: classes not among the model's: {sorted(set(names) - set(class_names))[:5]}")
            remap = np.array([class_names.index(n) for n in names], dtype=np.int32)
            table = table.set_column(2, "label", pa.array(remap[table.column("label").to_numpy()]))
            names = class_names
    if table.num_rows == 0:
        raise ValueError(f"{uri}: no labeled images")
    if (np.asarray(table.column("label")) < 0).any() or (np.asarray(table.column("label")) >= len(names)).any():
        raise ValueError(f"{uri}: label index out of range for {len(names)} classes")
    return table, names
