"""The project's packaging: its metadata reads without a deprecation warning (a quiet install), and the wheel
carries the dashboard's assets."""

import warnings
from pathlib import Path

from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parents[1]


def test_the_metadata_raises_no_deprecation_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, Warning)] == []
    assert dist.metadata.license_expression == "Apache-2.0"


def test_the_dashboard_ships_in_the_package():
    dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    patterns = dist.package_data["api"]
    shipped = {p.relative_to(ROOT / "api").as_posix() for pattern in patterns for p in (ROOT / "api").glob(pattern)}
    assert {
        "ui/index.html",
        "ui/app.js",
        "ui/app.css",
        "ui/vendor/uPlot.iife.min.js",
        "ui/vendor/uPlot.min.css",
        "ui/vendor/uPlot.LICENSE",
    } <= shipped
