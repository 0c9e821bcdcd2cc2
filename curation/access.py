"""What may be read: URIs normalised once, and checked against allowed roots wherever they are read.

The control plane checks a request's sources against the roots of its principal and stores them normalised;
the jobs check every URI they read again (a manifest's rows, a teacher, labeled and eval sets) against the
roots that the spec carries, so a manifest cannot name ``/etc/shadow`` or another bucket.

Normal forms: a local path is absolute with its symlinks resolved (``os.path.realpath``: what is checked is
what is read); an S3 URI is ``s3://bucket/key`` with no empty, ``.`` or ``..`` segment (such a URI is refused,
never rewritten: S3 keys are literal, and ``s3://victim/../allowed`` must not pass as ``s3://allowed``).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from curation import storage
from curation.config import clean_text
from curation.errors import UserError
from curation.imaging import NOT_REGULAR_FILE, OUTSIDE_ROOTS, TOO_LARGE


class BadUri(ValueError):
    """A URI that cannot be used: unsupported scheme, NUL bytes, lone surrogates, dot segments."""


def normalize(uri: str) -> str:
    """The normal form of ``uri`` (see the module docstring), or BadUri."""
    try:
        clean_text(uri)
    except ValueError as e:
        raise BadUri(f"{e} in a path") from None
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" not in uri:
        if not uri:
            raise BadUri("an empty path")
        return os.path.realpath(uri)
    scheme, rest = uri.split("://", 1)
    if scheme != "s3":
        raise BadUri(f"unsupported scheme {scheme!r}: use a path or s3://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise BadUri(f"{uri}: no bucket")
    parts = key.split("/")
    if key.endswith("/"):
        parts = parts[:-1]  # a prefix: s3://b/pool/ is s3://b/pool
    if any(p in ("", ".", "..") for p in parts) and key:
        raise BadUri(f"{uri}: empty, '.' or '..' segments are not allowed in an S3 key")
    return f"s3://{bucket}/{'/'.join(parts)}" if key else f"s3://{bucket}"


def under(normalized: str, roots: list[str] | tuple[str, ...]) -> bool:
    """``normalized`` is a root or lies inside one (``s3://b/pool`` does not contain ``s3://b/pool2``)."""
    return any(normalized == root or normalized.startswith(root.rstrip("/") + "/") for root in roots)


class Refused(ValueError):
    """A URI that the policy does not let a job read; ``reason`` is one of the rejects' reasons."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ReadPolicy:
    """Where a job may read from and how much: checked at every read, whatever named the URI."""

    roots: tuple[str, ...] | None = None  # normalised roots; None: anywhere (a generation run by hand)
    max_bytes: int = 64 << 20  # the largest file read whole (DecodeConfig.max_file_bytes)

    def check(self, uri: str) -> str:
        """``uri`` normalised, or Refused(outside_roots) when it is not under a root (or not a usable URI)."""
        try:
            normalized = normalize(uri)
        except BadUri as e:
            raise Refused(OUTSIDE_ROOTS, str(e)) from None
        if self.roots is not None and not under(normalized, self.roots):
            raise Refused(OUTSIDE_ROOTS, "not under an allowed root")
        return normalized

    def require(self, name: str, uri: str) -> str:
        """``uri`` normalised, or a UserError saying that ``name`` (a source, a model folder a job was given)
        may not be read: what a request named is the request's fault, not a reject."""
        try:
            return self.check(uri)
        except Refused as e:
            raise UserError(f"{name} {uri} may not be read: {e.detail}") from None

    def read(self, uri: str) -> bytes:
        """The whole file or object at ``uri`` if the policy allows it: Refused with ``outside_roots``,
        ``not_regular_file`` or ``too_large``; FileNotFoundError and the like for the caller's ``missing``."""
        normalized = self.check(uri)
        if "://" in normalized:
            fs, path = storage.resolve(normalized)
            with fs.open_input_stream(path, compression=None) as f:
                data = f.read(self.max_bytes + 1)
        else:
            # Opened without blocking (a FIFO would wait for a writer for ever), then checked on the open file
            # itself, so what is checked is what is read.
            fd = os.open(normalized, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise Refused(NOT_REGULAR_FILE, "not a regular file (a device, FIFO, socket or folder)")
                if info.st_size > self.max_bytes:
                    raise Refused(TOO_LARGE, f"{info.st_size} bytes, over the cap of {self.max_bytes}")
            except BaseException:
                os.close(fd)
                raise
            with os.fdopen(fd, "rb") as f:
                data = f.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise Refused(TOO_LARGE, f"over the cap of {self.max_bytes} bytes")
        return data
