"""PNG plots of a demo run, written into its run folder: what people would rather look at than read.

Contract: ``write_run_plots(out)`` reads ``<out>/results.json`` and each ``<out>/gen-*/dataset/stats.json``
and writes ``<out>/plots/``: ``accuracy.png`` (test accuracy and pseudo-label accuracy per generation) and,
per student generation g, ``gen-<g>-curation.png`` (per class: predicted, above the floor, kept, copies) and
``gen-<g>-confidence.png`` (each class's confidence histogram with its threshold and the floor marked).
Returns the files written. Matplotlib runs headless (Agg); nothing else is read or written.
"""

from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display, on any machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from curation.stats import ClassStats, DatasetStats  # noqa: E402

BARS = (
    ("predicted", "predicted", "#4c78a8"),
    ("above_floor", "above the floor", "#f58518"),
    ("kept", "kept", "#54a24b"),
    ("copies", "copies", "#8e6bb5"),
)


def accuracy_plot(generations: list[dict], path: str, title: str = "") -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    gens = [g["generation"] for g in generations]
    ax.plot(gens, [100 * g["test_accuracy"] for g in generations], "o-", color="#4c78a8", label="test accuracy")
    pseudo = [
        (g["generation"], 100 * g["pseudo_label_accuracy"])
        for g in generations
        if g.get("pseudo_label_accuracy") is not None
    ]
    if pseudo:
        ax.plot(*zip(*pseudo), "s--", color="#f58518", label="pseudo-label accuracy (kept)")
    for g in generations:
        ax.annotate(
            f"{100 * g['test_accuracy']:.1f}%",
            (g["generation"], 100 * g["test_accuracy"]),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(gens, [f"{g}\n{'teacher' if g == 0 else 'student'}" for g in gens])
    ax.set_xlabel("generation")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "Noisy Student: accuracy per generation")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def curation_plot(stats: DatasetStats, path: str, title: str = "") -> str:
    names = [c.class_name for c in stats.classes]
    x = np.arange(len(names))
    width = 0.2
    fig, ax = plt.subplots(figsize=(max(6.4, 0.6 * len(names)), 3.8), dpi=110)
    for i, (key, label, colour) in enumerate(BARS):
        ax.bar(x + (i - 1.5) * width, [getattr(c, key) for c in stats.classes], width, label=label, color=colour)
    ax.axhline(
        stats.images_per_class, color="#555", linestyle=":", linewidth=1, label=f"K = {stats.images_per_class:,}"
    )
    ax.set_xticks(x, names)
    ax.set_xlabel("class")
    ax.set_ylabel("images")
    ax.set_title(title or f"Curation per class (floor {stats.config.confidence_floor})")
    ax.legend(fontsize=8, ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def confidence_plot(stats: DatasetStats, path: str, title: str = "") -> str:
    classes = [c for c in stats.classes if c.confidence_histogram] or []
    panels: list[ClassStats | None] = list(classes) or [None]
    cols = min(5, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows + 0.6), dpi=110, squeeze=False, sharex=True)
    for ax, c in zip(axes.flat, panels):
        counts = c.confidence_histogram if c is not None else stats.confidence_histogram
        edges = np.arange(len(counts)) / len(counts)
        ax.bar(edges, counts, width=1 / len(counts), align="edge", color="#4c78a8")
        ax.axvline(stats.config.confidence_floor, color="#888", linestyle="--", linewidth=1)
        if c is not None:
            ax.axvline(c.threshold, color="#d62728", linewidth=1.5)
            ax.set_title(f"{c.class_name}: threshold {c.threshold:.2f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title or "Top-1 confidence per class (red: threshold, dashed: floor)", fontsize=10)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_run_plots(out: str) -> list[str]:
    """The plots of a demo run folder (see the module docstring)."""
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    plots = os.path.join(out, "plots")
    gens = results["generations"]
    written = [
        accuracy_plot(
            gens,
            os.path.join(plots, "accuracy.png"),
            f"Noisy Student on MNIST digits, 100 labels (seed {results.get('seed', 0)})",
        )
    ]
    for g in gens:
        stats_path = os.path.join(out, f"gen-{g['generation']}", "dataset", "stats.json")
        if not os.path.exists(stats_path):
            continue  # the teacher (gen 0) curates nothing
        with open(stats_path) as f:
            stats = DatasetStats.model_validate(json.load(f))
        n = g["generation"]
        written.append(
            curation_plot(
                stats,
                os.path.join(plots, f"gen-{n}-curation.png"),
                f"Generation {n}: curation per class (floor {stats.config.confidence_floor}, "
                f"K = {stats.images_per_class:,})",
            )
        )
        written.append(
            confidence_plot(
                stats,
                os.path.join(plots, f"gen-{n}-confidence.png"),
                f"Generation {n}: top-1 confidence per class (red: threshold, dashed: floor)",
            )
        )
    return written
