import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from curation import balance
from curation.balance import CurationConfig


def predictions(spec: dict[int, list[tuple[float, int]]], start_id: int = 1) -> pa.Table:
    """Rows per class from (confidence, count) pairs; image ids are consecutive."""
    labels, conf = [], []
    for c, groups in spec.items():
        for value, count in groups:
            labels += [c] * count
            conf += [value] * count
    n = len(labels)
    return pa.table(
        {
            "image_id": pa.array(np.arange(start_id, start_id + n), pa.int64()),
            "uri": pa.array([f"img/{i}.png" for i in range(n)]),
            "label": pa.array(labels, pa.int32()),
            "confidence": pa.array(conf, pa.float32()),
        }
    )


def curate_table(table: pa.Table, config: CurationConfig, num_classes: int):
    hist = balance.class_histogram(table.column("label").to_numpy(), table.column("confidence").to_numpy(), num_classes)
    plan = balance.plan(hist, config)
    return plan, balance.assign_copies(table, plan, config.seed)


def per_class(manifest: pa.Table, num_classes: int):
    labels = manifest.column("label").to_numpy()
    copies = manifest.column("copies").to_numpy()
    return np.bincount(labels, minlength=num_classes), np.bincount(labels, weights=copies, minlength=num_classes)


# class 0: too small (25 images, all confident); class 1: too large (400 at 0.95);
# class 2: thresholds walk down (50 at 0.99, 60 at 0.80, 100 at 0.50); class 3: only under the floor.
SPEC = {
    0: [(0.9, 25)],
    1: [(0.95, 400)],
    2: [(0.99, 50), (0.80, 60), (0.50, 100)],
    3: [(0.2, 80), (0.29, 20)],
}


def test_histogram_bins_and_float32_edges():
    conf = np.array([0.0, 0.005, 0.3, 0.29, 0.999, 0.99989, 1.0], dtype=np.float32)
    # 1.00 has a bin of its own, as the official filter's 101st threshold
    assert balance.confidence_bins(conf).tolist() == [0, 0, 30, 29, 99, 99, 100]
    hist = balance.class_histogram(np.array([0, 0, 1]), np.array([0.3, 0.31, 0.3], np.float32), 2)
    assert hist.shape == (2, 101)
    assert hist[0, 30] == 1 and hist[0, 31] == 1 and hist[1, 30] == 1 and hist.sum() == 3


def test_a_class_with_k_images_at_exactly_one_gets_the_threshold_one():
    """As in the official filter: with K images at confidence 1.0, the 0.999 ones of that class are left out."""
    table = predictions({0: [(1.0, 30), (0.999, 50)], 1: [(0.9, 40)]})
    plan, manifest = curate_table(table, CurationConfig(images_per_class=30, seed=0), 2)
    assert plan.thresholds[0] == pytest.approx(1.0) and plan.eligible[0] == 30
    kept = manifest.filter(pc.equal(manifest.column("label"), 0))
    assert kept.num_rows == 30 and pc.min(kept.column("confidence")).as_py() == pytest.approx(1.0)


def test_histogram_rejects_unknown_class():
    with pytest.raises(ValueError, match="label out of range"):
        balance.class_histogram(np.array([3]), np.array([0.5], np.float32), 3)


def test_thresholds_and_copies_exact():
    table = predictions(SPEC)
    config = CurationConfig(images_per_class=100, seed=7)
    plan, manifest = curate_table(table, config, 4)

    assert plan.images_per_class == 100
    # small class: nothing reaches K, so the threshold is the floor; 25 images x 4 copies = exactly K
    assert plan.thresholds[0] == pytest.approx(0.30)
    assert plan.eligible[0] == 25 and plan.ratio[0] == pytest.approx(4.0)
    # large class: K is reached in the 0.95 bin, all 400 are eligible at 0.25 copies each
    assert plan.thresholds[1] == pytest.approx(0.95)
    assert plan.eligible[1] == 400 and plan.ratio[1] == pytest.approx(0.25)
    # walking down: 50 at bin 99, 110 once bin 80 is reached -> threshold 0.80, the 0.50 images are out
    assert plan.thresholds[2] == pytest.approx(0.80)
    assert plan.eligible[2] == 110 and plan.ratio[2] == pytest.approx(100 / 110)
    # everything under the floor: nothing eligible, nothing kept
    assert plan.eligible[3] == 0

    kept, copies = per_class(manifest, 4)
    assert kept[0] == 25 and copies[0] == 100
    assert (manifest.filter(pa.compute.equal(manifest.column("label"), 0)).column("copies").to_numpy() == 4).all()
    # downsampled class: exactly the images whose seeded draw is under 0.25, each once
    ids1 = table.filter(pa.compute.equal(table.column("label"), 1)).column("image_id").to_numpy()
    expected = ids1[balance._uniform(ids1, 7) < 0.25]
    got = manifest.filter(pa.compute.equal(manifest.column("label"), 1))
    assert sorted(got.column("image_id").to_pylist()) == sorted(expected.tolist())
    assert set(got.column("copies").to_pylist()) == {1}
    assert abs(copies[1] - 100) <= 4 * np.sqrt(400 * 0.25 * 0.75)  # binomial(400, 0.25)
    # class 2: only the 110 images at >= 0.80 can be kept, each with 0 or 1 copies
    got2 = manifest.filter(pa.compute.equal(manifest.column("label"), 2))
    assert (got2.column("confidence").to_numpy() >= 0.8 - 1e-6).all()
    assert set(got2.column("copies").to_pylist()) == {1}
    assert kept[3] == 0 and copies[3] == 0


def test_floor_is_never_crossed():
    # K far above every class: thresholds stay at the floor, and nothing under it is kept
    table = predictions({0: [(0.31, 10), (0.30, 5), (0.29, 50)], 1: [(0.1, 10)]})
    plan, manifest = curate_table(table, CurationConfig(images_per_class=1000, confidence_floor=0.3), 2)
    assert plan.thresholds.tolist() == [0.30, 0.30]
    assert plan.eligible.tolist() == [15, 0]
    assert manifest.num_rows == 15
    assert (manifest.column("confidence").to_numpy() >= np.float32(0.3)).all()
    # 1000/15 = 66.67 copies each: 66, plus one more where the image's seeded draw is under 2/3
    ids = manifest.column("image_id").to_numpy()
    expected = 66 + (balance._uniform(ids, 0) < 1000 / 15 - 66)
    assert manifest.column("copies").to_numpy().tolist() == expected.tolist()


def test_no_balancing_keeps_everything_above_floor_once():
    table = predictions(SPEC)
    plan, manifest = curate_table(table, CurationConfig(balance=False), 4)
    kept, copies = per_class(manifest, 4)
    assert kept.tolist() == [25, 400, 210, 0]
    assert copies.tolist() == [25, 400, 210, 0]
    assert plan.thresholds.tolist() == [0.30] * 4


def test_no_upsampling_keeps_small_classes_once_and_still_downsamples():
    table = predictions(SPEC)
    plan, manifest = curate_table(table, CurationConfig(images_per_class=100, upsample=False, seed=7), 4)
    kept, copies = per_class(manifest, 4)
    assert kept[0] == 25 and copies[0] == 25
    assert plan.ratio[1] == pytest.approx(0.25)
    assert copies[1] < 400 and set(manifest.column("copies").to_pylist()) == {1}


def test_default_k_is_mean_count_above_floor():
    table = predictions(SPEC)
    plan, _ = curate_table(table, CurationConfig(), 4)
    assert plan.images_per_class == round((25 + 400 + 210 + 0) / 4)


def test_same_seed_same_manifest_whatever_the_blocks():
    table = predictions(SPEC)
    config = CurationConfig(images_per_class=100, seed=3)
    plan, whole = curate_table(table, config, 4)
    parts = [balance.assign_copies(table.slice(i, 97), plan, config.seed) for i in range(0, table.num_rows, 97)]
    split = pa.concat_tables(parts)
    assert split.sort_by("image_id").equals(whole.sort_by("image_id"))

    def digest(t):
        return balance.rows_digest(
            t.column("image_id").to_numpy(), t.column("label").to_numpy(), t.column("copies").to_numpy()
        )

    assert digest(split) == digest(whole)
    _, other = curate_table(table, config.model_copy(update={"seed": 4}), 4)
    assert not other.sort_by("image_id").equals(whole.sort_by("image_id"))
    assert digest(other) != digest(whole)


def test_config_validation():
    with pytest.raises(ValueError):
        CurationConfig(confidence_floor=1.5)
    with pytest.raises(ValueError):
        CurationConfig(images_per_class=0)
