"""Training never fails on one image: a bad image in a data batch is skipped, and counted by reason in the
model's metrics."""

import os

import numpy as np
import pytest
import torch

from curation import imaging
from service import pipeline
from tests import helpers
from trainer import loop, models, noise
from trainer.config import TrainConfig


def edge_and_good(root: str, good: int = 4) -> tuple[list[str], dict[str, str]]:
    expected = helpers.write_edge_files(root)
    paths, bad = helpers.write_pool(os.path.join(root, "plain"), good=good)
    expected.update(bad)
    return paths, expected


def test_load_pixels_marks_each_bad_image_with_its_reason(tmp_path):
    good, expected = edge_and_good(str(tmp_path))
    uris = good + list(expected) + [str(tmp_path / "gone.png")]
    batch = {"uri": np.array(uris, dtype=object), "label": np.arange(len(uris))}
    out = noise.load_pixels(batch, size=32, crop_pct=1.0, noise=None, mean=(0.5, 0.5, 0.5))
    reasons = [imaging.REJECT_REASONS[c] if c >= 0 else "" for c in out[noise.SKIP]]
    assert reasons == [""] * len(good) + list(expected.values()) + ["missing"]
    assert out["pixels"].shape == (len(uris), 32, 32, 3) and out["label"].tolist() == list(range(len(uris)))
    kept = out[noise.SKIP] < 0
    assert out["pixels"][kept].any(axis=(1, 2, 3)).all() and not out["pixels"][~kept].any()
    assert noise.skipped_counts(out[noise.SKIP]) == {
        "missing": 1,
        "empty": 2,
        "not_an_image": 2,
        "corrupt": 6,
        "too_large": 1,
        "bad_geometry": 2,
    }


def test_iter_pixels_gives_every_row_once_in_pieces(tmp_path):
    good, expected = edge_and_good(str(tmp_path))
    uris = good + list(expected)
    batch = {"uri": np.array(uris, dtype=object), "label": np.arange(len(uris))}
    pieces = list(noise.iter_pixels(batch, size=16, crop_pct=1.0, noise=None, mean=(0.5,) * 3, chunk_rows=5))
    assert [len(p["label"]) for p in pieces] == [5, 5, 5, 5, 2]
    labels = np.concatenate([p["label"] for p in pieces])
    skip = np.concatenate([p[noise.SKIP] for p in pieces])
    assert sorted(labels.tolist()) == list(range(len(uris)))
    assert {uris[i]: (imaging.REJECT_REASONS[c] if c >= 0 else "") for i, c in zip(labels, skip)} == {
        **{u: "" for u in good},
        **expected,
    }


def test_usable_leaves_out_skipped_rows_and_counts_them():
    def part(skip):
        n = len(skip)
        return {
            "pixels": torch.arange(n).view(n, 1, 1, 1).expand(n, 2, 2, 3).clone(),
            "target": torch.ones(n, 4),
            noise.SKIP: torch.tensor(skip, dtype=torch.int8),
        }

    counts = torch.zeros(len(imaging.REJECT_REASONS), dtype=torch.int64)
    pixels, target = loop._usable((part([-1, 3, -1]), part([5, -1])), counts)
    assert pixels[:, 0, 0, 0].tolist() == [0, 2, 1] and target.shape == (3, 4)
    assert dict(zip(imaging.REJECT_REASONS, counts.tolist()))["corrupt"] == 1
    assert dict(zip(imaging.REJECT_REASONS, counts.tolist()))["bad_geometry"] == 1
    # nothing usable: the step runs on the whole batch with zero targets, so its loss is 0
    pixels, target = loop._usable((part([2, 2]),), counts)
    assert len(pixels) == 2 and not target.any()
    assert counts.sum() == 4


def test_held_out_evaluation_gives_accuracy_and_cross_entropy_of_the_usable_rows(tmp_path):
    helpers.untrained_model(str(tmp_path / "m"))
    model, meta = models.load(str(tmp_path / "m"))
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "pixels": torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8),
            "label": torch.randint(0, 10, (n,), generator=g),
            noise.SKIP: torch.tensor(skip, dtype=torch.int8),
        }
        for n, skip in ((5, [-1, -1, 3, -1, -1]), (3, [-1, -1, -1]))
    ]
    out = loop._evaluate(model, meta, torch.device("cpu"), 1, batches, lambda what: None, "validation", "skipped")
    ok = [b[noise.SKIP] < 0 for b in batches]
    with torch.no_grad():
        logits = torch.cat([models.scorer(model, meta)(b["pixels"][k]) for b, k in zip(batches, ok)])
    labels = torch.cat([b["label"][k] for b, k in zip(batches, ok)])
    assert out["validation_images"] == 7 and out["skipped_corrupt"] == 1
    assert out["validation_accuracy"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert out["validation_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    assert out["validation_loss"] > 0


def test_training_skips_bad_images_and_records_them_in_the_model(ray_cluster, tmp_path):
    """Labeled and eval folders with a decompression bomb, a 1 x 1,000,000 strip and a truncated PNG among
    16 digits: training finishes; model.json counts each skipped image by reason."""
    rng = np.random.default_rng(0)
    root = tmp_path / "labeled"
    for c in ("0", "1"):
        os.makedirs(root / c)
        for i in range(8):
            (root / c / f"{i}.png").write_bytes(helpers.image_bytes(rng))
    (root / "0" / "bomb.png").write_bytes(helpers.png_bomb())
    (root / "1" / "strip.png").write_bytes(helpers.EDGE_FILES["strip-1x1000000.png"][0](rng))
    (root / "1" / "truncated.png").write_bytes(helpers.BAD_FILES["truncated.png"][0](rng))
    # one step of a batch as large as the folder: every labeled row is consumed exactly once
    config = TrainConfig(
        architecture="test_resnet",
        input_size=32,
        mean=(0.13,) * 3,
        std=(0.31,) * 3,
        steps=1,
        batch_size=19,
        warmup_steps=0,
        checkpoint_every=1,
        shuffle_buffer=0,
    )
    result = pipeline.train_teacher(config, labeled=str(root), eval=str(root), output=str(tmp_path / "out"))
    metrics = models.load_meta(result.model_uri).metrics
    assert metrics["skipped_images"] == 3
    assert (metrics["skipped_too_large"], metrics["skipped_bad_geometry"], metrics["skipped_corrupt"]) == (1, 1, 1)
    assert metrics["eval_skipped_images"] == 3 and metrics["test_images"] == 16
    assert (
        metrics["eval_skipped_too_large"],
        metrics["eval_skipped_bad_geometry"],
        metrics["eval_skipped_corrupt"],
    ) == (1, 1, 1)
