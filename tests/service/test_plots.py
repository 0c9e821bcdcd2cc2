"""The demo's plots: PNG files of accuracy per generation, curation per class and confidence histograms."""

import json

import numpy as np
from PIL import Image

from curation.balance import CurationConfig
from curation.stats import ClassStats, DatasetStats
from service.plots import write_run_plots


def stats(classes: int = 10) -> DatasetStats:
    rng = np.random.default_rng(0)
    per_class = []
    for c in range(classes):
        hist = rng.integers(0, 50, 100)
        per_class.append(
            ClassStats(
                class_index=c,
                class_name=str(c),
                predicted=int(hist.sum()),
                above_floor=int(hist[30:].sum()),
                threshold=0.3 + c / 100,
                eligible=int(hist[30 + c :].sum()),
                kept=int(hist[30 + c :].sum()),
                copies=300,
                confidence_histogram=hist.tolist(),
            )
        )
    total = np.sum([c.confidence_histogram for c in per_class], axis=0)
    return DatasetStats(
        dataset_id="d-1",
        images_seen=int(total.sum()),
        images_decoded=int(total.sum()),
        rejected={},
        images_per_class=300,
        classes=per_class,
        confidence_histogram=total.tolist(),
        config=CurationConfig(),
        config_hash="0",
        manifest_uri="/m",
        manifest_rows=3000,
        manifest_copies=3000,
        manifest_checksum="0",
        predictions_uri="/p",
    )


def test_a_run_folder_gets_its_plots(tmp_path):
    gens = [
        {"generation": g, "test_accuracy": 0.9 + g / 100, "pseudo_label_accuracy": None if g == 0 else 0.94}
        for g in range(3)
    ]
    (tmp_path / "results.json").write_text(json.dumps({"seed": 0, "generations": gens}))
    for g in (1, 2):
        (tmp_path / f"gen-{g}" / "dataset").mkdir(parents=True)
        (tmp_path / f"gen-{g}" / "dataset" / "stats.json").write_text(stats().model_dump_json())

    written = write_run_plots(str(tmp_path))
    names = sorted(p.rsplit("/", 1)[1] for p in written)
    assert names == [
        "accuracy.png",
        "gen-1-confidence.png",
        "gen-1-curation.png",
        "gen-2-confidence.png",
        "gen-2-curation.png",
    ]
    for path in written:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width >= 600 and img.height >= 300
            # Not a blank canvas: a plot has many colours.
            assert len(img.convert("RGB").getcolors(1 << 20)) > 20
