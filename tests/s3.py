"""Buckets on the session's S3 server (tests/conftest.py ``s3_proxy``: moto behind the fault proxy)."""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor

from curation import storage


def client():
    """A boto3 client of the session's S3, with the project's retry policy (``curation.storage.s3_client``)."""
    return storage.s3_client()


def new_bucket(prefix: str = "nst") -> str:
    """A fresh, empty bucket; returns its s3:// URI."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    client().create_bucket(Bucket=name)
    return f"s3://{name}"


def upload_folder(folder: str, uri: str) -> list[str]:
    """Every file under ``folder`` to the prefix ``uri``, same relative paths; returns the object URIs."""
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    pairs = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            key = "/".join(p for p in (prefix.strip("/"), os.path.relpath(path, folder)) if p)
            pairs.append((path, key))
    s3 = client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda pk: s3.upload_file(pk[0], bucket, pk[1]), pairs))
    return sorted(f"s3://{bucket}/{key}" for _, key in pairs)
