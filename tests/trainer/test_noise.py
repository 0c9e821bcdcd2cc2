import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from curation import imaging
from trainer import noise
from trainer.config import NoiseConfig, TrainConfig


def test_hard_targets_are_smoothed_one_hot():
    t = noise.hard_targets(np.array([2, 0]), 4, 0.1)
    assert t.shape == (2, 4)
    assert np.allclose(t.sum(axis=1), 1.0)
    assert t[0, 2] == pytest.approx(0.925) and t[0, 0] == pytest.approx(0.025)


def test_soft_targets_renormalise_and_sharpen():
    classes = np.array([[3, 1], [0, 2]])
    probs = np.array([[0.6, 0.2], [0.5, 0.5]], dtype=np.float16)
    t1 = noise.soft_targets(classes, probs, 4, temperature=1.0)
    assert np.allclose(t1.sum(axis=1), 1.0)
    assert t1[0, 3] == pytest.approx(0.75, abs=1e-3) and t1[0, 1] == pytest.approx(0.25, abs=1e-3)
    assert t1[0, 0] == 0 and t1[0, 2] == 0
    sharp = noise.soft_targets(classes, probs, 4, temperature=0.5)
    assert sharp[0, 3] == pytest.approx(0.9, abs=1e-3)  # 0.36 / (0.36 + 0.04)
    assert np.allclose(sharp[1, [0, 2]], 0.5)


def test_randaugment_changes_images_and_can_be_turned_off():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    aug = noise.randaugment(NoiseConfig(randaugment_ops=2, randaugment_magnitude=9), (0.5, 0.5, 0.5))
    outs = [np.asarray(aug(img)) for _ in range(20)]
    assert all(o.shape == (32, 32, 3) for o in outs)
    assert any(not np.array_equal(o, np.asarray(img)) for o in outs)
    assert noise.randaugment(NoiseConfig(randaugment_ops=0), (0.5, 0.5, 0.5)) is None


def test_unlabeled_batch_size_follows_ratio():
    assert TrainConfig(batch_size=16, unlabeled_ratio=3).unlabeled_batch_size == 48
    with pytest.raises(ValueError):
        NoiseConfig(dropout=1.0)


def test_the_data_tasks_noise_images_without_importing_torch():
    """A data task's process imports trainer.data and noises with timm's RandAugment, yet never imports torch or
    the timm package (3 s of CPU per process); the transform is timm's own, the same ops as through timm."""
    code = (
        "import sys, numpy as np; from PIL import Image; import trainer.data; from trainer import noise;"
        "from trainer.config import NoiseConfig;"
        "aug = noise.randaugment(NoiseConfig(randaugment_ops=2, randaugment_magnitude=9), (0.5, 0.5, 0.5));"
        "img = Image.fromarray(np.zeros((8, 8, 3), np.uint8)); aug(img);"
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules), [op.name for op in aug.ops][:3])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    from timm.data.auto_augment import rand_augment_transform

    timm_ops = [op.name for op in rand_augment_transform("rand-m9-n2-mstd0.5", {}).ops][:3]
    assert out[0] == f"[] {timm_ops}"


def test_randaugment_honours_magnitudes_over_ten():
    """timm clips the magnitude at 10 unless told its maximum: magnitude 27 must stay 27, each op at 2.7 times
    its range (a rotation of up to 81 degrees), not silently 10."""
    strong = noise.randaugment(NoiseConfig(randaugment_magnitude=27, randaugment_magnitude_std=0), (0.5,) * 3)
    assert {(op.magnitude, op.magnitude_max) for op in strong.ops} == {(27, 27)}
    rotate = next(op for op in strong.ops if op.name == "Rotate")
    assert abs(rotate.level_fn(27, rotate.hparams)[0]) == pytest.approx(81.0)
    default = noise.randaugment(NoiseConfig(), (0.5,) * 3)
    assert {(op.magnitude, op.magnitude_max) for op in default.ops} == {(9, 10)}


def test_crop_flip_and_erasing_as_the_paper_can_be_turned_on_and_off():
    """Random-resized crops differ from the centre crop and from each other; a flip mirrors; erasing replaces
    one rectangle; with the defaults (off) the image is the centre crop, unchanged but for RandAugment."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    centre = np.asarray(imaging.resize_square(img, 32))
    off = noise.ImageNoise(NoiseConfig(randaugment_ops=0), (0.5,) * 3)
    assert np.array_equal(np.asarray(off(off.resize(img, 32, 1.0))), centre)

    crops = noise.ImageNoise(NoiseConfig(randaugment_ops=0, crop_scale=0.08), (0.5,) * 3)
    outs = [np.asarray(crops.resize(img, 32, 1.0)) for _ in range(10)]
    assert all(o.shape == (32, 32, 3) for o in outs)
    assert len({o.tobytes() for o in outs} | {centre.tobytes()}) == 11

    flips = noise.ImageNoise(NoiseConfig(randaugment_ops=0, flip=True), (0.5,) * 3)
    square = Image.fromarray(centre)
    outs = [np.asarray(flips(square)) for _ in range(40)]
    mirrored = [np.array_equal(o, centre[:, ::-1]) for o in outs]
    assert 0 < sum(mirrored) < 40 and all(m or np.array_equal(o, centre) for m, o in zip(mirrored, outs))

    erase = noise.ImageNoise(NoiseConfig(randaugment_ops=0, erase_prob=1.0), (0.5,) * 3)
    changed = (np.asarray(erase(square)) != centre).any(axis=2)
    rows, cols = np.nonzero(changed)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0.02 * 32 * 32 * 0.5 <= changed.sum() <= box <= 32 * 32 / 3 + 64
