"""One way to reach every artifact: a local path or an ``s3://`` URI, through pyarrow's filesystems."""

from __future__ import annotations

import functools
import json
import os
import posixpath
from typing import Any, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def s3_endpoint() -> str | None:
    """The S3 endpoint from the standard AWS variables (any S3-speaking server: MinIO, Ceph, moto), or None."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


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
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint(), region_name=s3_region())
    prefix = parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=parsed.netloc, Prefix=prefix):
        for obj in page.get("Contents", ()):
            key = obj["Key"]
            if key.endswith("/") or any(part.startswith(".") for part in key[len(prefix):].split("/")):
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
