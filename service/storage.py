"""One way to reach every artifact: a local path or an ``s3://`` URI, through pyarrow's filesystems."""

from __future__ import annotations

import functools
import json
import os
import posixpath
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str) -> pafs.FileSystem:
    if scheme in ("", "file"):
        return pafs.LocalFileSystem()
    if scheme == "s3":
        # Endpoint and credentials come from the standard AWS variables; AWS_ENDPOINT_URL points at any
        # S3-speaking server (MinIO, Ceph, moto).
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs)
    raise ValueError(f"unsupported storage scheme {scheme!r}: use a local path or s3://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds ``uri`` and the path inside it."""
    if not is_remote(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return _filesystem("", ""), os.path.abspath(path)
    parsed = urlparse(uri)
    return _filesystem(parsed.scheme, parsed.netloc), parsed.netloc + parsed.path


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


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
    return sorted(
        prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
    )
