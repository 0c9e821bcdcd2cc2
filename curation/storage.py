"""One way to reach every artifact: a local path or an ``s3://`` URI, through pyarrow's filesystems.

S3 requests follow one retry policy, whichever client makes them (pyarrow's S3 filesystem for objects,
Parquet and Ray Train checkpoints; boto3 for listing): throttling (503 SlowDown), 5xx answers, timeouts and
broken connections are retried with exponential backoff, 4xx answers are not; at most ``S3_MAX_ATTEMPTS``
attempts per request, with the connect and request timeouts below. An error that outlasts those retries is an
infrastructure failure: ``read_many`` raises it as ``StorageUnavailable`` rather than passing it off as a
property of one object. Errors that are about one object (it does not exist, it may not be read, its URI is not
one) come back per object, for the caller to record.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from ray.data import Dataset

# Attempts per S3 request, the first one included. At a 10% rate of failed requests, 10 attempts leave one
# request in 10^10 failing for a transient reason. pyarrow waits 25 ms x 2^n before its n-th retry, so a store
# that stays down fails a request after about 13 s of retrying; boto3 (standard mode) waits up to 20 s at
# random before each retry.
S3_MAX_ATTEMPTS = 10
# Seconds to open a TCP (and TLS) connection to the store before the attempt counts as failed and is retried.
S3_CONNECT_TIMEOUT_SECONDS = 5.0
# Seconds a request may wait for data from the store before the attempt fails and is retried: boto3's read
# timeout; pyarrow passes it to the AWS SDK on Windows and macOS only (on Linux the SDK's own defaults hold).
S3_REQUEST_TIMEOUT_SECONDS = 60.0
# Connections boto3 keeps per client: at least as many as the threads that share one.
S3_MAX_POOL_CONNECTIONS = 64
# Object reads in flight per ``read_many`` call unless told otherwise: enough to hide a remote store's
# per-request latency. An S3 object read is two requests (HEAD, GET), about 40 ms within a region: 32 reads in
# flight give about 800 objects/s, more than one core decodes (about 500 photos a second at 224 px).
DEFAULT_READ_CONCURRENCY = 32


# Runs of a Ray Data task that reads images after the first when the store fails it (StorageUnavailable): with
# about 13 s of client retries per run and Ray Data's backoff between runs (2^n s at random, up to 32 s), an
# outage of 64 to 94 s is ridden out. Labeling's read and decode tasks and training's data tasks all take it.
TASK_RETRIES = 4


class StorageUnavailable(OSError):
    """The store failed a request after every retry (throttling, 5xx, broken connections, timeouts): a fault
    of the infrastructure, never of one object."""


def retry_on_store(ds: Dataset) -> Dataset:
    """``ds``, whose map tasks, and those of every dataset made from it, run again (up to ``TASK_RETRIES``
    times, in the same task, with backoff) when the store failed them: ``StorageUnavailable``. Other errors
    are bugs, not retried. Ray Data runs a task again by itself when its worker or node is lost."""
    ds.context.retried_map_errors = [f"{StorageUnavailable.__module__}.{StorageUnavailable.__qualname__}"]
    ds.context.max_map_retries = TASK_RETRIES
    return ds


def is_object_error(e: BaseException) -> bool:
    """Whether an error from reading one object is about that object (it does not exist or may not be read,
    or its URI is not one), not about the store."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)):
        return True
    # pyarrow raises a plain OSError for S3's 403 on one object; its message names the AWS error.
    return isinstance(e, OSError) and "ACCESS_DENIED" in str(e)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def s3_endpoint() -> str | None:
    """The S3 endpoint from the standard AWS variables (any S3-speaking server: MinIO, Ceph, moto), or None."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


class S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with this module's retry policy and timeouts, kept when it is pickled (Ray
    ships filesystems to its tasks and Train workers; pyarrow's own pickling drops the retry strategy)."""

    def __init__(self, **kwargs: Any):
        self._kwargs = dict(kwargs)
        super().__init__(
            # Not AwsStandardS3RetryStrategy: through pyarrow (26.0) its retry quota is drawn on every retry and
            # never paid back, so a filesystem stops retrying for good after about 100 retries in its lifetime
            # (measured against the fault proxy: bench/s3proxy.py). A Ray worker lives for the whole job.
            # Its max_attempts counts retries (measured: 4 makes 5 requests), hence the 1 less.
            retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS - 1),
            connect_timeout=S3_CONNECT_TIMEOUT_SECONDS,
            request_timeout=S3_REQUEST_TIMEOUT_SECONDS,
            **kwargs,
        )

    def __reduce__(self):
        return _make_s3_filesystem, (self._kwargs,)


def _make_s3_filesystem(kwargs: dict[str, Any]) -> S3FileSystem:
    return S3FileSystem(**kwargs)


def s3_client():
    """A boto3 S3 client with the same endpoint, region, retry policy and timeouts as the filesystem."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
        connect_timeout=S3_CONNECT_TIMEOUT_SECONDS,
        read_timeout=S3_REQUEST_TIMEOUT_SECONDS,
        max_pool_connections=S3_MAX_POOL_CONNECTIONS,
    )
    return boto3.client("s3", endpoint_url=s3_endpoint(), region_name=s3_region(), config=config)


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str) -> pafs.FileSystem:
    if scheme in ("", "file"):
        return pafs.LocalFileSystem()
    if scheme == "s3":
        # Credentials come from the AWS SDK's usual chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
        # (+ AWS_SESSION_TOKEN), a profile, or the pod's web identity.
        kwargs: dict[str, Any] = {}
        endpoint = s3_endpoint()
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        if s3_region():
            kwargs["region"] = s3_region()
        return S3FileSystem(**kwargs)
    raise ValueError(f"unsupported storage scheme {scheme!r}: use a local path or s3://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds ``uri`` and the path inside it."""
    if not is_remote(uri):
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return _filesystem("", ""), os.path.abspath(path)
    parsed = urlparse(uri)
    return _filesystem(parsed.scheme, parsed.netloc), parsed.netloc + parsed.path


def ray_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """Ray Train's ``(storage_path, storage_filesystem)`` for a folder or an ``s3://`` prefix: on S3 this
    module's filesystem, so checkpoints follow the same retry policy (from a bare URI, Ray would build an S3
    filesystem with pyarrow's defaults: 3 attempts)."""
    if not is_remote(uri):
        return uri, None
    fs, path = resolve(uri)
    return path, fs


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    # compression=None: the bytes as stored, whatever the name ends with (pyarrow would gunzip "x.gz").
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def iter_read(
    uris: Iterable[str],
    concurrency: int = DEFAULT_READ_CONCURRENCY,
    reader: Callable[[str], bytes] | None = None,
) -> Iterator[bytes | Exception]:
    """The whole contents of each URI, in order, read ``concurrency`` at a time in threads (pyarrow releases
    the GIL while it waits on the store), for objects small enough to hold in memory (images).

    Yields each object's bytes, or the error that is about that object (``is_object_error``: it does not exist,
    may not be read, or its URI is not one; or MemoryError: too large to hold), for the caller to record. Any
    other error, once the client's own retries are spent, raises ``StorageUnavailable`` and cancels the reads not
    yet started. At most ``2 * concurrency`` objects are read ahead of the one being yielded. ``reader`` reads
    one URI (default ``read_bytes``; a job passes its ``curation.access.ReadPolicy.read``, whose refusals come
    back per object as ValueErrors).
    """
    read = reader or read_bytes
    if concurrency <= 1:
        for uri in uris:
            yield _read_one(uri, read)
        return
    window = 2 * concurrency
    with ThreadPoolExecutor(concurrency, thread_name_prefix="storage-read") as pool:
        pending: deque[Future] = deque()
        try:
            for uri in uris:
                pending.append(pool.submit(_read_one, uri, read))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:  # on an error or an abandoned iterator: start no more reads
                f.cancel()


def read_many(uris: Iterable[str], concurrency: int = DEFAULT_READ_CONCURRENCY) -> list[bytes | Exception]:
    """``iter_read`` as a list: every object's bytes or its own error; raises ``StorageUnavailable``."""
    return list(iter_read(uris, concurrency))


def _read_one(uri: str, read: Callable[[str], bytes]) -> bytes | Exception:
    try:
        return read(uri)
    except MemoryError as e:  # an object too large to hold: about that object
        return e
    except (OSError, ValueError) as e:
        return object_error(uri, e)


def object_error(uri: str, e: OSError | ValueError) -> OSError | ValueError:
    """``e``, an error from reading ``uri``, if it is about that object (``is_object_error``); else raises it
    as ``StorageUnavailable``, a fault of the store."""
    if is_object_error(e):
        return e
    raise StorageUnavailable(f"{uri}: {type(e).__name__}: {e}"[:500]) from e


@contextlib.contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """Within it, an ``OSError`` about ``uri`` itself (``is_object_error``: missing, forbidden) is raised as it
    is; any other, a store still failing after its client's retries, as ``StorageUnavailable``: in a Ray Data
    task, that runs the task again (``retry_on_store``) instead of failing the job; in the API, a 503."""
    try:
        yield
    except OSError as e:
        raise object_error(uri, e) from e


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    # Write then move, so a reader never sees half a file (local disks; S3 puts are atomic already).
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, *, suffix: str = "") -> list[str]:
    """Files under a folder or prefix, recursively, as URIs of the same form, sorted."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def iter_files(uri: str) -> Iterator[str]:
    """Files under a folder or prefix, recursively, one at a time and never all in memory.

    A local folder is walked directory by directory (names sorted within each); an S3 prefix is read a page of
    1,000 keys at a time (keys come in lexicographic order). Hidden files and folders (``.name``) are skipped.
    """
    if not is_remote(uri):
        _, root = resolve(uri)
        if not os.path.isdir(root):
            return
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    yield os.path.join(folder, name)
        return
    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        raise ValueError(f"unsupported storage scheme {parsed.scheme!r}: use a local path or s3://")
    client = s3_client()
    prefix = parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=parsed.netloc, Prefix=prefix):
        for obj in page.get("Contents", ()):
            key = obj["Key"]
            if key.endswith("/") or any(part.startswith(".") for part in key[len(prefix) :].split("/")):
                continue  # folder markers and hidden files
            yield f"s3://{parsed.netloc}/{key}"


def delete_dir_contents(uri: str) -> None:
    fs, path = resolve(uri)
    fs.delete_dir_contents(path, missing_dir_ok=True)


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def move(src: str, dst: str) -> None:
    """Rename within one filesystem (a copy then a delete on S3)."""
    fs, src_path = resolve(src)
    _, dst_path = resolve(dst)
    fs.create_dir(posixpath.dirname(dst_path), recursive=True)
    fs.move(src_path, dst_path)


def parquet_rows(uri: str) -> int | None:
    """Rows of a Parquet file from its footer alone; None while it is missing, unreadable or still being
    written."""
    import pyarrow.parquet as pq

    try:
        fs, path = resolve(uri)
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        return None
