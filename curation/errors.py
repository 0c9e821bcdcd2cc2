"""Errors that say whose fault a failure is, so that the control plane knows whether running again can help.

A ``UserError`` is bad input: the request must change (another source, a lower confidence floor, the
teacher's classes). Anything else that stops a job is taken to be the cluster's: a lost node, memory, storage.
"""

from __future__ import annotations


class UserError(ValueError):
    """The request cannot work as it is; the message says what to change."""
