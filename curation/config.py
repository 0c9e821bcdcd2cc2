"""The base of every user-facing config: finite numbers only, unknown fields refused, strings without NUL.

A request is validated here before anything runs: NaN or Infinity in a learning rate, a NUL byte or a lone
surrogate in a path, are a 422 that names the field, never a failure later inside Ray.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

# The largest seed: numpy and torch take seeds below 2**63.
MAX_SEED = 2**63 - 1


def clean_text(value: str) -> str:
    """``value`` if it holds no NUL byte and no lone surrogate; else ValueError saying which."""
    if "\x00" in value:
        raise ValueError("a NUL byte is not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a lone surrogate is not allowed (not valid Unicode)") from None
    return value


# A string that can be stored, logged and used as a path: no NUL byte, no lone surrogate.
CleanStr = Annotated[str, AfterValidator(clean_text)]


class Config(BaseModel):
    """Finite floats everywhere (``allow_inf_nan=False``)."""

    model_config = ConfigDict(allow_inf_nan=False)
