"""Image sources in four formats (``SourceFormat``), each usable as the unlabeled pool or a labeled set:

- ``files``: a folder or prefix of image files; labeled: an ImageFolder (``<root>/<class>/<file>``);
- ``manifest``: Parquet with a ``uri`` column (+ ``image_id``); labeled: ``uri`` and ``label`` columns;
- ``webdataset``: WebDataset tar shards (one ``.tar``, or a folder or prefix of them); labeled: the ``.cls``
  member of each key;
- ``parquet-bytes``: Parquet files with the image bytes in an ``image`` column (binary, or Hugging Face's
  ``{bytes, path}`` struct); labeled: a ``label`` column.

Every image gets a stable int64 ``image_id``: the first 8 bytes of BLAKE2b over its URI. The same file has
the same id in every run, so predictions, manifests and resumed jobs can be joined on it. An image inside a
tar shard or a Parquet file has the URI ``<container URI>#<member>`` (``curation.shards``).
"""

from __future__ import annotations

import enum
import hashlib
import json
import posixpath
import tarfile
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation import shards, storage
from curation.errors import UserError

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


class SourceFormat(enum.StrEnum):
    """How a source keeps its images (see the module's docstring)."""

    FILES = "files"
    MANIFEST = "manifest"
    WEBDATASET = "webdataset"
    PARQUET_BYTES = "parquet-bytes"


def infer_format(uri: str) -> SourceFormat:
    """The format of a source from its URI and, for Parquet, its columns: a ``.tar`` (``.tar.gz``, ``.tgz``) is
    a WebDataset shard; Parquet with an ``image`` column holds image bytes, with a ``uri`` column it is a
    manifest; anything else is a folder of files. A folder or prefix of tar shards, or of Parquet files not
    named ``*.parquet``, must name its format: inferring it would mean listing the folder."""
    if shards.is_tar(uri):
        return SourceFormat.WEBDATASET
    if not is_manifest(uri):
        return SourceFormat.FILES
    files = manifest_files(uri)
    if not files:
        raise UserError(f"{uri}: no Parquet files")
    fs, path = storage.resolve(files[0])
    names = pq.read_schema(path, filesystem=fs).names
    if shards.IMAGE_COLUMN in names:
        return SourceFormat.PARQUET_BYTES
    if "uri" in names:
        return SourceFormat.MANIFEST
    raise UserError(
        f"{uri}: Parquet with neither a {shards.IMAGE_COLUMN!r} column (image bytes) nor a 'uri' "
        f"column (a manifest); columns: {names[:10]}"
    )


def resolve_format(uri: str, fmt: SourceFormat | str | None = None) -> SourceFormat:
    """``fmt`` as a SourceFormat, or the format inferred from ``uri`` when it is None."""
    return infer_format(uri) if fmt is None else SourceFormat(fmt)


def container_files(uri: str, fmt: SourceFormat) -> list[str]:
    """The containers of a WebDataset (tar shards) or parquet-bytes source, sorted: the file itself, or the
    files with the format's suffix under a folder or prefix."""
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{uri}: no such file, folder or prefix")
    suffixes = shards.TAR_SUFFIXES if fmt is SourceFormat.WEBDATASET else (shards.PARQUET_SUFFIX,)
    found = [
        u for u in storage.list_files(uri) if u.lower().endswith(suffixes) and not posixpath.basename(u).startswith(".")
    ]
    if not found:
        raise UserError(f"{uri}: no {' / '.join(suffixes)} files for the {fmt.value} format")
    return found


# Rows of the (image_id, uri, data) tables that the image readers below yield: images carried with their bytes.
IMAGE_ROWS_SCHEMA = pa.schema([("image_id", pa.int64()), ("uri", pa.string()), ("data", pa.large_binary())])


def _image_rows(uris: list[str], data: list[bytes] | pa.Array) -> pa.Table:
    return pa.table(
        {
            "image_id": pa.array(image_ids(uris), pa.int64()),
            "uri": pa.array(uris, pa.string()),
            "data": pa.array(data, pa.large_binary()) if isinstance(data, list) else data,
        },
        schema=IMAGE_ROWS_SCHEMA,
    )


def read_tar_images(shard_uri: str, *, chunk_rows: int, chunk_bytes: int = 64 << 20) -> Iterator[pa.Table]:
    """Every image member of a tar shard as (image_id, uri, data) tables of at most ``chunk_rows`` rows (or
    about ``chunk_bytes``), in the order of the tar, in one sequential pass over the shard. Members that are not
    images (``.cls``, ``.json``, ...) are skipped unread. A shard that is not a readable tar is a UserError
    naming it (storage errors stay OSError: reading again may help)."""
    uris: list[str] = []
    data: list[bytes] = []
    size = 0
    try:
        for name, blob in shards.iter_tar(shard_uri, shards.is_image_member):
            if blob is None:
                continue
            uris.append(shards.member_uri(shard_uri, name))
            data.append(blob)
            size += len(blob)
            if len(uris) >= chunk_rows or size >= chunk_bytes:
                yield _image_rows(uris, data)
                uris, data, size = [], [], 0
    except tarfile.TarError as e:
        raise UserError(f"{shard_uri}: not a readable tar shard: {type(e).__name__}: {e}") from None
    if uris:
        yield _image_rows(uris, data)


def read_parquet_images(file_uri: str, row_group: int, *, chunk_rows: int) -> Iterator[pa.Table]:
    """The rows of one row group of a parquet-bytes file as (image_id, uri, data) tables of at most
    ``chunk_rows`` rows; a row's URI is ``<file URI>#<row index in the file>``."""
    fs, path = storage.resolve(file_uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        if shards.IMAGE_COLUMN not in pf.schema_arrow.names:
            raise UserError(f"{file_uri}: no {shards.IMAGE_COLUMN!r} column of image bytes")
        first = shards.row_group_starts(pf.metadata)[row_group]
        for batch in pf.iter_batches(batch_size=chunk_rows, row_groups=[row_group], columns=[shards.IMAGE_COLUMN]):
            uris = [shards.member_uri(file_uri, first + i) for i in range(batch.num_rows)]
            first += batch.num_rows
            yield _image_rows(uris, shards.image_bytes(batch.column(0)))


def list_folder(root: str) -> list[str]:
    """Every file under ``root``; files that are not images are listed too, so they are counted as rejects."""
    return [u for u in storage.list_files(root) if not posixpath.basename(u).startswith(".")]


def unlabeled_manifest(root: str) -> pa.Table:
    """(image_id, uri) for every file under a folder, in the order of their ids, in memory: for small folders
    only (``index`` streams any number of files into a manifest)."""
    return _unlabeled_table(list_folder(root))


def index(source_uri: str, out_uri: str, *, row_group_rows: int = INDEX_ROW_GROUP_ROWS) -> int:
    """List every file under a folder or S3 prefix once into a Parquet manifest of (image_id, uri).

    Returns the number of rows. Memory stays at one row group of URIs however many files there are: the listing
    is streamed page by page and written a row group at a time. Within a row group, rows are in the order of
    their ``image_id`` (a hash of the URI): a stable, pseudo-random order that spreads the classes a folder
    listing keeps together, so that labeling, and the manifest it leads to, do not walk one class at a time.
    The manifest is written under a temporary name and then moved into place, so a manifest that exists is
    complete. Hidden files are skipped; files that are not images are listed too, so that labeling counts them
    as rejects.
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
    ids = image_ids(uris)
    order = np.argsort(ids, kind="stable")
    return pa.table(
        {"image_id": pa.array(ids[order]), "uri": pa.array(uris, pa.string()).take(pa.array(order))},
        schema=UNLABELED_SCHEMA,
    )


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
    out: list[tuple[str, int, int]] = []
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
    ids = (
        table.column("image_id").cast(pa.int64())
        if "image_id" in table.column_names
        else pa.array(image_ids(uris.to_pylist()), pa.int64())
    )
    return pa.table({"image_id": ids, "uri": uris}, schema=UNLABELED_SCHEMA)


def image_folder(root: str) -> tuple[pa.Table, list[str]]:
    """(image_id, uri, label) for an ImageFolder, and the class names (sorted sub-folder names)."""
    uris = [u for u in list_folder(root) if u.lower().endswith(IMAGE_EXTENSIONS)]
    base = root.rstrip("/")
    rel = [u[len(base) + 1 :] for u in uris]
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


def labeled_source(
    uri: str, class_names: list[str] | None = None, fmt: SourceFormat | str | None = None
) -> tuple[pa.Table, list[str]]:
    """A labeled source as (image_id, uri, label) and its class names.

    ``uri`` is, by ``fmt`` (default: inferred, ``infer_format``): an ImageFolder; a Parquet manifest with ``uri``
    and ``label`` columns (class name strings, or integer indices when ``class_names`` is given); WebDataset tar
    shards whose ``.cls`` members hold each key's class (an integer index or a class name); or parquet-bytes
    files with a ``label`` column (integer or string; Hugging Face's ClassLabel names, kept in the file's
    metadata, turn integers into names). Integer labels of the last two with no names anywhere are their own
    names: ``"0"``, ``"1"``, ... Passing ``class_names`` pins the label order, so an evaluation split is scored
    in the teacher's class order.

    A WebDataset is streamed once, shard by shard, reading only the ``.cls`` members; a parquet-bytes source
    reads only its ``label`` column.
    """
    fmt = resolve_format(uri, fmt)
    if fmt is SourceFormat.MANIFEST:
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs, columns=["uri", "label"])
        uris = table.column("uri").to_pylist()
        idx, names = _label_indices(uri, table.column("label").combine_chunks(), class_names)
        table = pa.table(
            {
                "image_id": pa.array(image_ids(uris)),
                "uri": pa.array(uris, pa.string()),
                "label": pa.array(idx, pa.int32()),
            }
        )
    elif fmt in (SourceFormat.WEBDATASET, SourceFormat.PARQUET_BYTES):
        reader = _webdataset_labels if fmt is SourceFormat.WEBDATASET else _parquet_bytes_labels
        uris, labels = reader(uri)
        idx, names = _label_indices(uri, labels, class_names, index_names=True)
        table = pa.table(
            {
                "image_id": pa.array(image_ids(uris), pa.int64()),
                "uri": pa.array(uris, pa.string()),
                "label": pa.array(idx, pa.int32()),
            }
        )
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


def _label_indices(
    uri: str, labels: pa.Array, class_names: list[str] | None, *, index_names: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Class indices of ``labels`` (integer indices or class name strings) and the class names. With
    ``index_names``, integers with no class names name themselves (``"0"`` .. ``str(max)``)."""
    if labels.null_count:
        raise UserError(f"{uri}: {labels.null_count} images without a label")
    if pa.types.is_integer(labels.type):
        if class_names is None:
            if not index_names:
                raise ValueError(f"{uri}: integer labels need class names")
            top = int(labels.to_numpy().max()) if len(labels) else -1
            class_names = [str(i) for i in range(top + 1)]
        return labels.to_numpy().astype(np.int32), class_names
    values = labels.to_pylist()
    names = class_names or sorted(set(values))
    lookup = {n: i for i, n in enumerate(names)}
    unknown = set(values) - lookup.keys()
    if unknown:
        raise ValueError(f"{uri}: labels not among the classes: {sorted(unknown)[:5]}")
    return np.array([lookup[v] for v in values], dtype=np.int32), names


def _webdataset_labels(uri: str) -> tuple[list[str], pa.Array]:
    """(member URIs, labels) of the images of a WebDataset: one pass over each shard, reading only the
    ``.cls`` members. Labels are integers where every ``.cls`` is one, else class name strings."""
    uris: list[str] = []
    texts: list[str] = []
    unlabeled: list[str] = []
    for shard in container_files(uri, SourceFormat.WEBDATASET):
        images: dict[str, list[str]] = {}
        classes: dict[str, str] = {}
        for name, data in shards.iter_tar(shard, lambda n: shards.key_field(n)[1] == shards.LABEL_FIELD):
            key, field = shards.key_field(name)
            if field in shards.IMAGE_FIELDS:
                images.setdefault(key, []).append(name)
            elif data is not None:
                classes[key] = data.decode("utf-8", errors="replace").strip()
        for key, names in images.items():
            if key not in classes:
                unlabeled.append(shards.member_uri(shard, names[0]))
                continue
            for name in names:
                uris.append(shards.member_uri(shard, name))
                texts.append(classes[key])
    if unlabeled:
        raise UserError(f"{uri}: {len(unlabeled)} images without a .{shards.LABEL_FIELD} member, e.g. {unlabeled[:3]}")
    try:
        return uris, pa.array([int(t) for t in texts], pa.int64())
    except ValueError:
        return uris, pa.array(texts, pa.string())


def _parquet_bytes_labels(uri: str) -> tuple[list[str], pa.Array]:
    """(row URIs, labels) of parquet-bytes files, from their ``label`` columns only. A file's integer
    labels with Hugging Face ClassLabel names in its metadata become those names, file by file."""
    uris: list[str] = []
    parts: list[pa.Array] = []
    for file_uri in container_files(uri, SourceFormat.PARQUET_BYTES):
        fs, path = storage.resolve(file_uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            columns = pf.schema_arrow.names
            if shards.IMAGE_COLUMN not in columns or shards.LABEL_COLUMN not in columns:
                raise UserError(
                    f"{file_uri}: a labeled parquet-bytes file needs {shards.IMAGE_COLUMN!r} and "
                    f"{shards.LABEL_COLUMN!r} columns; it has {columns[:10]}"
                )
            labels = pf.read(columns=[shards.LABEL_COLUMN]).column(0).combine_chunks()
            names = hf_class_names(pf.schema_arrow)
        if pa.types.is_dictionary(labels.type):
            labels = labels.dictionary_decode()
        if pa.types.is_integer(labels.type) and names is not None and not labels.null_count:
            ints = labels.to_numpy()
            if ints.size and (ints.min() < 0 or ints.max() >= len(names)):
                raise UserError(f"{file_uri}: label index out of range for its {len(names)} class names")
            labels = pa.array(np.asarray(names, dtype=object)[ints], pa.string())
        parts.append(labels.cast(pa.int64() if pa.types.is_integer(labels.type) else pa.string()))
        uris.extend(shards.member_uri(file_uri, i) for i in range(pf.metadata.num_rows))
    if len({p.type for p in parts}) > 1:
        raise UserError(f"{uri}: some files have integer labels and others class names")
    return uris, pa.concat_arrays(parts) if parts else pa.array([], pa.int64())


def hf_class_names(schema: pa.Schema) -> list[str] | None:
    """The names of a Hugging Face ``ClassLabel`` ``label`` feature, from the ``huggingface`` metadata that the
    ``datasets`` library writes into its Parquet files; None where there is none."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][shards.LABEL_COLUMN]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if names else None
