"""The service layer's errors; api/errors.py maps each to one HTTP status, in one place."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The request is wrong (the caller's fault): 422, naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class NotFound(LookupError):
    """No such generation, dataset or model: 404."""


class Conflict(RuntimeError):
    """The request cannot apply to the resource in its current state: 409."""


class Unavailable(RuntimeError):
    """A dependency (database, Ray, storage) cannot be reached now: 503."""
