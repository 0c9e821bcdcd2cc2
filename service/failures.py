"""Whose fault a job's failure is, and ``error.json``, the job's own word on it for the control plane.

The control plane submits a job again only when the cluster is to blame: a node or worker died, memory ran
out, an actor died, storage failed after its client's own retries, or the Ray head restarted. A bad request
fails at once, with a message that says what to change.
"""

from __future__ import annotations

import logging

from curation import storage
from curation.errors import UserError
from curation.layout import ErrorKind, JobError, Layout

log = logging.getLogger(__name__)


def classify(error: BaseException) -> ErrorKind:
    """``user`` for bad input (a ``UserError``, or a ``ValueError`` such as an invalid spec, raised by the job's
    own code), ``infra`` for everything else: Ray's system errors, memory, storage, or a task's failure that
    is not bad input."""
    from ray.exceptions import RayTaskError

    if isinstance(error, RayTaskError):  # a task's exception, as the driver sees it
        cause = error.cause
        return ErrorKind.USER if isinstance(cause, UserError) else ErrorKind.INFRA
    if isinstance(error, UserError):
        return ErrorKind.USER
    if isinstance(error, ValueError) and not isinstance(error, (OSError, MemoryError)):
        # pyarrow's ArrowInvalid is a ValueError: an unreadable manifest is the request's too.
        return ErrorKind.USER
    return ErrorKind.INFRA


# The longest error text in a log line that may repeat every poll while a dependency is down.
LOG_LINE = 300


def one_line(error: BaseException, limit: int = 1000) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:limit]


def report(output: str, submission_id: str, error: BaseException) -> JobError:
    """Write ``<output>/jobs/<submission id>/error.json``; best effort (the job fails either way)."""
    found = JobError(kind=classify(error), message=one_line(error), exception=type(error).__name__)
    try:
        storage.write_json(Layout(output).error(submission_id), found.model_dump(mode="json"))
    except Exception:
        log.warning("could not write the error report of %s", submission_id, exc_info=True)
    return found
