"""The timm architectures a request may name, known without importing timm (or torch).

``architectures.txt`` is ``timm.list_models()`` of the pinned timm version, one name a line; a test checks it
against the installed timm. Regenerate it when timm is upgraded:

    .venv/bin/python -c "import timm; print(*sorted(timm.list_models()), sep='\\n')" > trainer/architectures.txt
"""

from __future__ import annotations

import difflib
import functools
from importlib.resources import files


@functools.cache
def known() -> frozenset[str]:
    return frozenset(files("trainer").joinpath("architectures.txt").read_text().split())


def check(name: str) -> str:
    """``name`` if timm has it; else a ValueError that names close ones."""
    if name not in known():
        close = difflib.get_close_matches(name, sorted(known()), n=8, cutoff=0.6)
        raise ValueError(f"unknown architecture {name!r}; timm has for example {close}")
    return name
