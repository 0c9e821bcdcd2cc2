"""Credentials out of every message: ``scheme://user:password@host`` and secret query parameters in URLs.

``RAY_ADDRESS`` and ``DATABASE_URL`` may carry credentials; an error that quotes them must not put them in a
response (``/readyz`` needs no token) or a log line.
"""

from __future__ import annotations

import logging
import re

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:token|access_token|password|secret|signature|X-Amz-Signature|"
    r"X-Amz-Credential|X-Amz-Security-Token)=)[^&\s]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with the user information of every URL and secret query values replaced by ``***``."""
    return _SECRET_QUERY.sub(r"\g<key>***", _USERINFO.sub(r"\g<scheme>***@", text))


class RedactingFilter(logging.Filter):
    """Redacts each record's message (its arguments merged in) before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install() -> None:
    """On every handler of the root logger (filters on a logger do not see its children's records)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
