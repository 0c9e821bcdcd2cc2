"""The corruption and perturbation suites (ImageNet-C and ImageNet-P in the manner of Hendrycks & Dietterich)."""

import pytest
import torch
import torch.nn.functional as F

from trainer import robustness as rb

RANDOM_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "affine", "elastic")
RANDOM_PERTURBATIONS = ("gaussian_noise", "translate", "rotate")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: with a second thread on a busy machine, each op waits for it (seconds a test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n: int = 6, side: int = 32, block: int = 5, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """uint8 NHWC: blocks of about ``block`` pixels a side, of random colours in [20, 235], so that every corruption
    shows."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(20, 236, (n, 3, side // block, side // block), generator=g).float()
    x = F.interpolate(coarse, size=(side, side), mode="nearest")
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().to(device)


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def change(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.mark.parametrize("kind", rb.CORRUPTIONS)
def test_every_corruption_keeps_shape_dtype_and_changes_the_image_more_at_severity_5(kind):
    for side in (32, 224):
        x = images(n=2 if side == 224 else 6, side=side)
        out = {s: rb.corrupt(x, kind, s, gen()) for s in (1, 5)}
        for y in out.values():
            assert y.shape == x.shape and y.dtype == torch.uint8 and y.device == x.device and y.is_contiguous()
        assert 0 < change(x, out[1]) < change(x, out[5]), (kind, side)


def test_the_table_has_five_severities_of_every_kind_and_the_kinds_cover_the_families():
    assert rb.SEVERITIES == 5 and len(rb.CORRUPTIONS) >= 8
    assert all(len(v) == rb.SEVERITIES for params in rb.SEVERITY.values() for v in params.values())
    for family in ("noise", "blur", "contrast", "brightness", "affine", "elastic"):
        assert any(family in kind for kind in rb.CORRUPTIONS), family


@pytest.mark.parametrize("kind", RANDOM_CORRUPTIONS)
def test_corruptions_are_determined_by_the_generator(kind):
    x = images()
    a, b, c = (rb.corrupt(x, kind, 3, gen(seed)) for seed in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_corrupt_refuses_unknown_kinds_severities_and_pixels():
    x = images()
    with pytest.raises(ValueError, match="unknown corruption"):
        rb.corrupt(x, "fog", 1, gen())
    for severity in (0, 6):
        with pytest.raises(ValueError, match="severity"):
            rb.corrupt(x, "contrast", severity, gen())
    with pytest.raises(ValueError, match="uint8"):
        rb.corrupt(x.float(), "contrast", 1, gen())
    with pytest.raises(ValueError, match="unknown perturbation"):
        next(rb.perturbation_frames(x, "snow", gen()))


def test_brightness_raises_the_hsv_value_and_keeps_the_hue():
    x = torch.tensor([[[[0, 0, 0], [100, 50, 0]]]], dtype=torch.uint8)  # black, orange
    y = rb.corrupt(x, "brightness", 5, gen())[0, 0]
    assert y[0].tolist() == [128, 128, 128]  # black turns grey: value 0.5
    assert y[1].tolist() == [228, 114, 0]  # value 100 / 255 + 0.5, the ratios of R, G, B kept


@pytest.mark.parametrize("kind", rb.PERTURBATIONS)
def test_perturbation_sequences_start_at_the_image_and_move_away(kind):
    x = images()
    frames = list(rb.perturbation_frames(x, kind, gen()))
    assert len(frames) == rb.FRAMES
    assert frames[0] is x
    for f in frames[1:]:
        assert f.shape == x.shape and f.dtype == torch.uint8 and not torch.equal(f, x)
    if kind != "gaussian_noise":  # the others grow: the last frame is further from the image than the second
        assert change(x, frames[1]) < change(x, frames[-1])


@pytest.mark.parametrize("kind", RANDOM_PERTURBATIONS)
def test_perturbations_are_determined_by_the_generator(kind):
    x = images()
    a, b, c = (torch.stack(list(rb.perturbation_frames(x, kind, gen(seed)))) for seed in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_translation_moves_by_whole_pixels():
    x = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
    x[:, 16, 16] = 255
    for frame in rb.perturbation_frames(x, "translate", gen()):
        # One pixel at full brightness in each image, none smeared over its neighbours.
        assert (frame == 255).all(dim=-1).sum(dim=(1, 2)).tolist() == [1] * 4
        assert int(frame.count_nonzero()) == 4 * 3


def constant(pixels: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(pixels), dtype=torch.int64, device=pixels.device)


def top_left(pixels: torch.Tensor) -> torch.Tensor:
    """A class from the brightness of the top-left pixel: sensitive to every perturbation."""
    return (pixels[:, 0, 0].float().mean(dim=-1) // 8).long()


def test_a_constant_model_never_flips_and_errs_as_on_clean_images():
    suite = rb.Suite(torch.device("cpu"))
    labels = torch.tensor([0, 1, 0, 2, 0, 3])
    suite.update(constant, images(), labels)
    m = rb.Suite.metrics(suite.counts)
    assert m["robustness_images"] == 6 and m["clean_error"] == 0.5
    assert m["corruption_error"] == 0.5 and m["flip_rate"] == 0.0
    for kind in rb.CORRUPTIONS:
        assert m[f"corruption_error_{kind}"] == 0.5
    for kind in rb.PERTURBATIONS:
        assert m[f"flip_rate_{kind}"] == 0.0


def test_a_perturbation_sensitive_model_flips_and_errs():
    suite = rb.Suite(torch.device("cpu"))
    x = images(n=16, block=1)
    suite.update(top_left, x, top_left(x))
    m = rb.Suite.metrics(suite.counts)
    assert m["clean_error"] == 0.0 and m["corruption_error"] > 0
    for kind in rb.PERTURBATIONS:
        assert 0 < m[f"flip_rate_{kind}"] <= 1, kind
    assert m["flip_rate"] == pytest.approx(sum(m[f"flip_rate_{k}"] for k in rb.PERTURBATIONS) / len(rb.PERTURBATIONS))


def test_noise_flips_count_against_the_first_frame_the_others_against_the_previous():
    x = images()

    def perturbed(pixels: torch.Tensor) -> torch.Tensor:  # 0 for the clean images, 1 for any other
        return (pixels != x).flatten(1).any(dim=1).long()

    suite = rb.Suite(torch.device("cpu"))
    suite.update(perturbed, x, torch.zeros(6, dtype=torch.int64))
    m = rb.Suite.metrics(suite.counts)
    assert m["flip_rate_gaussian_noise"] == 1.0  # every noisy frame differs from the clean first
    for kind in ("translate", "rotate", "scale", "brightness"):
        assert m[f"flip_rate_{kind}"] == pytest.approx(1 / (rb.FRAMES - 1))  # only the first step flips
    assert m["clean_error"] == 0 and m["corruption_error"] == 1.0


def recorder(seen: list[torch.Tensor]):
    def predict(pixels: torch.Tensor) -> torch.Tensor:
        seen.append(pixels.clone())
        return top_left(pixels)

    return predict


def test_two_models_on_the_same_batches_see_the_same_corrupted_images():
    x, labels = images(), torch.zeros(6, dtype=torch.int64)
    runs = []
    for seed in (0, 0, 1):
        seen: list[torch.Tensor] = []
        suite = rb.Suite(torch.device("cpu"), seed=seed)
        suite.update(recorder(seen), x, labels)
        suite.update(recorder(seen), x, labels)
        runs.append(seen)
    # 1 clean + every kind at every severity + the frames after the first of every sequence, per batch.
    per_batch = 1 + len(rb.CORRUPTIONS) * rb.SEVERITIES + len(rb.PERTURBATIONS) * (rb.FRAMES - 1)
    assert len(runs[0]) == 2 * per_batch
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))
    # The second batch, the same images, gets its own noise.
    first, second = runs[0][:per_batch], runs[0][per_batch:]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


def test_max_images_cuts_the_batch_and_then_stops():
    calls: list[torch.Tensor] = []
    suite = rb.Suite(torch.device("cpu"), max_images=8)
    for _ in range(3):
        suite.update(recorder(calls), images(), torch.zeros(6, dtype=torch.int64))
    assert rb.Suite.metrics(suite.counts)["robustness_images"] == 8
    sizes = [len(p) for p in calls]  # the first batch's 6 images, then the 2 left of the second, then none
    assert sizes == [6] * (len(calls) // 2) + [2] * (len(calls) // 2)
    assert rb.Suite.metrics(rb.Suite(torch.device("cpu")).counts) == {}


def test_metrics_of_summed_counts_are_means_over_all_images():
    """As after an all_reduce: each rank's counts summed, each kind's error the mean over every image."""
    a, b = rb.Suite(torch.device("cpu")), rb.Suite(torch.device("cpu"))
    x = images(n=8)
    a.update(constant, x[:2], torch.zeros(2, dtype=torch.int64))  # no errors
    b.update(constant, x[2:], torch.ones(6, dtype=torch.int64))  # every image wrong
    assert a.counts.dtype == torch.float64 and a.counts.device.type == "cpu"
    m = rb.Suite.metrics(a.counts + b.counts)
    assert m["robustness_images"] == 8 and m["corruption_error"] == 0.75 and m["corruption_error_elastic"] == 0.75


def test_a_suite_made_in_inference_mode_can_be_reduced_outside_it():
    with torch.inference_mode():
        suite = rb.Suite(torch.device("cpu"))
        suite.update(constant, images(n=2), torch.zeros(2, dtype=torch.int64))
    suite.counts += 1  # as dist.all_reduce: in place, outside inference mode
    assert rb.Suite.metrics(suite.counts)["robustness_images"] == 3


def metrics(error: float, flips: float) -> dict[str, float]:
    return {
        "corruption_error": error,
        "flip_rate": flips,
        **{f"corruption_error_{k}": error * (i + 1) / 10 for i, k in enumerate(rb.CORRUPTIONS)},
        **{f"flip_rate_{k}": flips * (i + 1) / 10 for i, k in enumerate(rb.PERTURBATIONS)},
    }


def test_relative_errors_and_flip_rates_are_percentages_of_the_baseline():
    m = metrics(0.4, 0.1)
    assert rb.relative(m, m) == pytest.approx({"mce": 100.0, "mfr": 100.0})
    assert rb.relative(m, metrics(0.8, 0.2)) == pytest.approx({"mce": 50.0, "mfr": 50.0})
    # mCE is a mean of ratios per kind, not a ratio of means.
    worse = {**m, f"corruption_error_{rb.CORRUPTIONS[0]}": m[f"corruption_error_{rb.CORRUPTIONS[0]}"] * 3}
    assert rb.relative(worse, m)["mce"] == pytest.approx(100 * (1 + 2 / len(rb.CORRUPTIONS)))


def test_relative_needs_every_kind_on_both_sides_and_a_baseline_above_zero():
    m = metrics(0.4, 0.1)
    lacking = {k: v for k, v in m.items() if k != f"corruption_error_{rb.CORRUPTIONS[-1]}"}
    assert rb.relative(m, lacking) == pytest.approx({"mfr": 100.0})
    assert rb.relative(lacking, m) == pytest.approx({"mfr": 100.0})
    assert rb.relative(m, metrics(0.4, 0.0)) == pytest.approx({"mce": 100.0})
    assert rb.relative(m, {}) == {} and rb.relative({}, m) == {}


def test_a_timm_model_runs_through_the_suite():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()

    def predict(pixels: torch.Tensor) -> torch.Tensor:
        return model(pixels.permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)).argmax(dim=1)

    suite = rb.Suite(torch.device("cpu"), max_images=8)
    with torch.inference_mode():
        suite.update(predict, images(n=8), torch.arange(8) % 10)
    m = rb.Suite.metrics(suite.counts)
    expected = {"robustness_images", "clean_error", "corruption_error", "flip_rate"}
    expected |= {f"corruption_error_{k}" for k in rb.CORRUPTIONS} | {f"flip_rate_{k}" for k in rb.PERTURBATIONS}
    assert set(m) == expected
    assert m.pop("robustness_images") == 8
    assert all(0 <= v <= 1 for v in m.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_suite_runs_on_cuda():
    x = images(device="cuda")
    for kind in rb.CORRUPTIONS:
        a, b = (rb.corrupt(x, kind, 5, gen(3, "cuda")) for _ in range(2))
        assert a.device.type == "cuda" and a.dtype == torch.uint8 and a.shape == x.shape
        assert torch.equal(a, b) and change(x, a) > 0
    for kind in rb.PERTURBATIONS:
        assert len(list(rb.perturbation_frames(x, kind, gen(3, "cuda")))) == rb.FRAMES
    suite = rb.Suite(torch.device("cuda"))
    suite.update(top_left, x, top_left(x))
    assert suite.counts.device.type == "cuda" and rb.Suite.metrics(suite.counts)["flip_rate"] > 0
