"""The import contract: packages import one way, from the bottom up (docs/architecture.md).

    curation -> trainer -> workers -> service -> api -> entry points (service/cli.py, service/server.py)

Every import of every module counts, those inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["curation", "trainer", "workers", "service", "api"]
ENTRY_POINTS = {"service.cli", "service.server"}


def modules() -> list[tuple[str, Path]]:
    found = []
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found.append((name, path))
    return found


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def layer(module: str) -> int | None:
    if module in ENTRY_POINTS:
        return len(LAYERS)
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


@pytest.mark.parametrize("name, path", modules(), ids=[m for m, _ in modules()])
def test_imports_point_down(name, path):
    mine = layer(name)
    upward = sorted(
        m for m in imported(path) if (other := layer(m)) is not None and other > mine and m.split(".")[0] in LAYERS
    )
    assert upward == [], f"{name} (layer {LAYERS[mine] if mine < len(LAYERS) else 'entry'}) imports {upward}"


def test_the_contract_covers_every_package():
    assert len(modules()) > 30 and {layer(m) for m, _ in modules()} == set(range(len(LAYERS) + 1))
