"""Images inside containers: WebDataset tar shards and Parquet files that hold image bytes.

A contained image has a URI of its own, ``<container URI>#<member>``:

- in a tar shard, the member is the name of the image file in the tar: ``s3://b/pool/000123.tar#abc.jpg``;
- in a Parquet file, the member is the row's index in the file, counted from 0 across its row groups:
  ``s3://b/pool/train-00000.parquet#1234``. (The ``path`` of a Hugging Face image struct is not used: it is
  often empty or a bare file name that repeats across files, and a row index is always there and unique.)

Its ``image_id`` is the BLAKE2b-64 of that URI, as for a file (``curation.sources.image_id``), so the same
member has the same id in every run as long as its container is not rewritten.

Containers are only ever streamed, never read at random: a tar shard from its first byte to its last in one
pass (``tarfile`` in stream mode, ``r|*``, over the storage's input stream: a pipe would do), a Parquet file
row group by row group. Whoever needs several members of one container asks for them together.

WebDataset's conventions: a member ``dir/abc.seg.png`` has the key ``dir/abc`` and the field ``seg.png``
(everything after the first dot of the file name). A member whose field is an image type (``jpg``, ``png``,
...) is an image; the ``cls`` member of the same key holds its class, as text: an integer index or a class
name. Other members (``json``, ``txt``, ...) are ignored.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curation import storage

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Bytes per read of a tar shard's stream: one S3 GET each, so a 1 GB shard takes 64 requests.
STREAM_BUFFER_BYTES = 16 << 20
PARQUET_SUFFIX = ".parquet"
# WebDataset fields that hold an image (the decoders WebDataset itself knows).
IMAGE_FIELDS = frozenset({"jpg", "jpeg", "png", "ppm", "pgm", "pbm", "pnm", "bmp", "gif", "webp", "tif", "tiff"})
LABEL_FIELD = "cls"
# The column of a Parquet file that holds the image: plain binary, or Hugging Face's {bytes, path} struct.
IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"

# A container URI ends in one of the suffixes and is followed by '#': the first such place splits a member URI
# (a '#' in a plain file name, or later in a member name, is kept where it is).
_MEMBER = re.compile(r"^(.*?(?:\.tar|\.tar\.gz|\.tgz|\.parquet))#(.+)$", re.IGNORECASE | re.DOTALL)


def member_uri(container: str, member: str | int) -> str:
    return f"{container}#{member}"


def split(uri: str) -> tuple[str, str] | None:
    """(container URI, member) of a member URI, or None for the URI of a plain file."""
    m = _MEMBER.match(uri)
    return (m.group(1), m.group(2)) if m else None


def is_tar(uri: str) -> bool:
    return uri.lower().endswith(TAR_SUFFIXES)


def is_parquet(uri: str) -> bool:
    return uri.lower().endswith(PARQUET_SUFFIX)


def key_field(name: str) -> tuple[str, str]:
    """WebDataset's (key, field) of a member name: the field is what follows the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, dot, field = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, field.lower() if dot else ""


def is_image_member(name: str) -> bool:
    return key_field(name)[1] in IMAGE_FIELDS


def iter_tar(uri: str, wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of every regular file of a tar shard, in the order of the tar, in one sequential pass.

    ``wanted(name)`` says whose bytes to read; the others come with None and their bytes are skipped in the
    stream. Raises OSError or ``tarfile.TarError`` where the shard cannot be read (members read before that
    have been yielded).
    """
    fs, path = storage.resolve(uri)
    # Buffered: tarfile reads 10 KiB at a time, and each read of an unbuffered S3 stream is a GET of its own.
    with (
        fs.open_input_stream(path, buffer_size=STREAM_BUFFER_BYTES) as raw,
        tarfile.open(fileobj=raw, mode="r|*") as tar,
    ):
        for info in tar:
            if not info.isfile():
                continue
            if wanted is None or wanted(info.name):
                f = tar.extractfile(info)
                yield info.name, f.read() if f is not None else b""
            else:
                yield info.name, None


def read_tar_members(uri: str, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """The bytes of the members ``names`` of a tar shard, in the order of the tar, in one sequential pass that
    stops once all are found. Names the shard does not hold are not yielded."""
    left = set(names)
    if not left:
        return
    for name, data in iter_tar(uri, left.__contains__):
        if data is not None:
            yield name, data
            left.discard(name)
            if not left:
                return


def image_bytes(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The image bytes of an ``image`` column: plain binary, or the ``bytes`` field of a {bytes, path} struct;
    a null image gives empty bytes (rejected as empty, never fetched from anywhere else)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ValueError(f"the {IMAGE_COLUMN!r} column is {column.type}: expected binary or a {{bytes, path}} struct")
    return column.cast(pa.large_binary()).fill_null(b"")


def row_group_starts(meta: pq.FileMetaData) -> list[int]:
    """The index in the file of the first row of every row group, and the file's row count last."""
    starts = [0]
    for g in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(g).num_rows)
    return starts


def read_parquet_rows(uri: str, rows: Iterable[int]) -> Iterator[tuple[int, bytes]]:
    """(row index, image bytes) of the rows ``rows`` of a Parquet file: one open, and only the row groups that
    hold them, read one at a time. Indices past the end of the file are not yielded."""
    wanted = sorted(set(int(r) for r in rows))
    if not wanted:
        return
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        starts = row_group_starts(pf.metadata)
        i = 0
        for g in range(pf.metadata.num_row_groups):
            lo, hi = starts[g], starts[g + 1]
            j = i
            while j < len(wanted) and wanted[j] < hi:
                j += 1
            mine = [r for r in wanted[i:j] if r >= lo]
            i = j
            if not mine:
                continue
            data = image_bytes(pf.read_row_group(g, columns=[IMAGE_COLUMN]).column(0))
            for r in mine:
                yield r, data[r - lo].as_py()
