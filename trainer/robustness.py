"""Robustness suites: corruption errors as in ImageNet-C, flip rates as in ImageNet-P.

Both come from Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (arXiv:1903.12261).

Corruptions. Each kind of ``CORRUPTIONS`` is applied to the test images at severities 1 to 5 (``SEVERITY`` holds
each kind's parameters); E_s,c is the model's top-1 error at severity s of kind c. A kind's corruption error is
its mean over the severities, ``corruption_error`` the mean over kinds. Against a baseline model (AlexNet in the
paper; here any model, by default the chain's first teacher), CE_c = sum_s E_s,c(f) / sum_s E_s,c(baseline),
and the mCE is the mean of CE_c over kinds, in percent (``relative``).

Perturbations. Each kind of ``PERTURBATIONS`` makes a sequence of ``FRAMES`` images from each test image: the
first is the image itself, the others are shifted, rotated, zoomed or brightened a little more at each frame, or
(``gaussian_noise``) each given its own noise. The flip rate is the share of frames whose top-1 class differs
from the previous frame's; for noise, whose frames have no order, from the first frame's, as in ImageNet-P. The
mFR is the mean over kinds of the flip rate relative to the baseline's, in percent.

The images are decoded batches (uint8 NHWC, on the model's device), corrupted there with torch ops, a whole batch
at once. Noise, contrast, brightness and pixelation take ImageNet-C's values. Geometric parameters follow the
image's side: shifts and displacements are shares of it; blur radii are ImageNet-C's pixels at a side of 224,
scaled by sqrt(side / 224): 0.4 to 2.3 pixels at 32, where scaling by the side would leave the mild ones under a
pixel, no blur at all.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

SEVERITIES = 5
FRAMES = 10

# Each kind's parameters at severities 1 to 5. Pixel values are in [0, 1].
SEVERITY: dict[str, dict[str, tuple[float, ...]]] = {
    # Added Gaussian noise: its standard deviation.
    "gaussian_noise": {"sigma": (0.08, 0.12, 0.18, 0.26, 0.38)},
    # Poisson noise: photons counted at full intensity.
    "shot_noise": {"photons": (60, 25, 12, 5, 3)},
    # Salt and pepper: the share of values set to 0 or 1.
    "impulse_noise": {"amount": (0.03, 0.06, 0.09, 0.17, 0.27)},
    # Gaussian blur: sigma in pixels at a side of 224.
    "gaussian_blur": {"sigma": (1, 2, 3, 4, 6)},
    # Mean over a disk: its radius in pixels at a side of 224.
    "defocus_blur": {"radius": (3, 4, 6, 8, 10)},
    # Towards the image's mean value: the factor left of each pixel's difference from it.
    "contrast": {"factor": (0.4, 0.3, 0.2, 0.1, 0.05)},
    # Added to the HSV value (hue and saturation kept).
    "brightness": {"shift": (0.1, 0.2, 0.3, 0.4, 0.5)},
    # Rotation (degrees) and shear (its tangent), each of random sign per image, then a zoom out; black fill.
    "affine": {
        "degrees": (5, 10, 15, 20, 30),
        "shear": (0.05, 0.1, 0.15, 0.2, 0.3),
        "zoom": (0.95, 0.9, 0.85, 0.8, 0.7),
    },
    # Random displacement field, white noise smoothed by a Gaussian of sigma `smoothness` (share of the side),
    # scaled to a root-mean-square displacement of `displacement` (share of the side) along each axis.
    "elastic": {
        "displacement": (0.01, 0.02, 0.03, 0.045, 0.06),
        "smoothness": (0.06, 0.06, 0.06, 0.06, 0.06),
    },
    # Box-averaged down to this share of the side, then back up by nearest neighbour.
    "pixelate": {"scale": (0.6, 0.5, 0.4, 0.3, 0.25)},
}
CORRUPTIONS: tuple[str, ...] = tuple(SEVERITY)

# Each sequence's perturbation at its last frame; frame j of FRAMES has j / (FRAMES - 1) of it.
PERTURBATION: dict[str, float] = {
    "gaussian_noise": 0.05,  # standard deviation, the same at every frame (frame 0 has none)
    "translate": 0.15,  # shift, share of the side in whole pixels, in a random direction per image
    "rotate": 15.0,  # degrees, of random sign per image
    "scale": 1.3,  # zoom in
    "brightness": 0.3,  # added to the HSV value
}
PERTURBATIONS: tuple[str, ...] = tuple(PERTURBATION)
# Flips counted against the first frame rather than the previous one.
_AGAINST_FIRST = frozenset({"gaussian_noise"})
# The elastic field is drawn and smoothed on a grid of at most this side, then resized to the image's.
_ELASTIC_GRID = 16


def corrupt(pixels: torch.Tensor, kind: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """``pixels`` (uint8 NHWC) with corruption ``kind`` at ``severity`` (1 to 5); random draws from
    ``generator``, which must be on the pixels' device."""
    return _to_uint8(_corrupt(_to_float(pixels), kind, severity, generator))


def perturbation_frames(pixels: torch.Tensor, kind: str, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The ``FRAMES`` frames (uint8 NHWC) of perturbation ``kind`` of ``pixels``; frame 0 is ``pixels``."""
    if kind not in PERTURBATION:
        raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(PERTURBATIONS)}")
    x = _to_float(pixels)
    yield pixels
    for frame in _perturbed(x, kind, generator):
        yield _to_uint8(frame)


class Suite:
    """Accumulates errors and flips over the batches of an evaluation: 96 predictions a batch (the clean images,
    10 kinds at 5 severities, 5 sequences of 9 frames after the first). ``counts`` is one float64 tensor on
    ``device`` (images, clean errors, errors per kind and severity, flips per perturbation), so that a
    data-parallel run can all_reduce it before ``metrics``."""

    def __init__(self, device: torch.device, seed: int = 0, max_images: int | None = None) -> None:
        self.device = torch.device(device)
        self.seed = seed
        self.max_images = max_images
        self.images = 0
        self.batches = 0
        # A normal tensor even when made in inference mode: all_reduce updates it in place.
        with torch.inference_mode(False):
            self.counts = torch.zeros(_SIZE, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(
        self, predict: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, labels: torch.Tensor
    ) -> None:
        """Runs every corruption at every severity and every perturbation sequence on a batch; ``predict`` maps
        uint8 NHWC pixels to each image's top-1 class. Batches past ``max_images`` are cut or skipped. Random
        draws are seeded by (seed, batch number, kind, severity): the same for every model given the same
        batches in the same order."""
        batch = self.batches
        self.batches += 1
        if self.max_images is not None:
            keep = max(self.max_images - self.images, 0)
            pixels, labels = pixels[:keep], labels[:keep]
        if len(pixels) == 0:
            return
        self.images += len(pixels)
        pixels, labels = pixels.to(self.device), labels.to(self.device)
        x = _to_float(pixels)
        clean = predict(pixels)
        self.counts[0] += len(pixels)
        self.counts[1] += (clean != labels).sum()
        for i, kind in enumerate(CORRUPTIONS):
            for severity in range(1, SEVERITIES + 1):
                g = self._generator(batch, kind, severity)
                pred = predict(_to_uint8(_corrupt(x, kind, severity, g)))
                self.counts[_ERRORS + i * SEVERITIES + severity - 1] += (pred != labels).sum()
        for i, kind in enumerate(PERTURBATIONS):
            previous = clean
            for frame in _perturbed(x, kind, self._generator(batch, kind, 0)):
                pred = predict(_to_uint8(frame))
                self.counts[_FLIPS + i] += (pred != previous).sum()
                previous = clean if kind in _AGAINST_FIRST else pred

    def _generator(self, batch: int, kind: str, severity: int) -> torch.Generator:
        key = f"{self.seed}/{batch}/{kind}/{severity}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        return torch.Generator(device=self.device).manual_seed(seed)

    @staticmethod
    def metrics(counts: torch.Tensor) -> dict[str, float]:
        """``robustness_images``, ``clean_error``, ``corruption_error`` (mean over kinds and severities),
        ``corruption_error_<kind>``, ``flip_rate`` (mean over perturbations) and ``flip_rate_<kind>``, as shares
        in [0, 1]; empty when no image was seen."""
        c = counts.detach().cpu().tolist()
        images = c[0]
        if images <= 0:
            return {}
        out = {"robustness_images": images, "clean_error": c[1] / images}
        errors = {}
        for i, kind in enumerate(CORRUPTIONS):
            start = _ERRORS + i * SEVERITIES
            errors[f"corruption_error_{kind}"] = sum(c[start : start + SEVERITIES]) / (SEVERITIES * images)
        flips = {f"flip_rate_{kind}": c[_FLIPS + i] / ((FRAMES - 1) * images) for i, kind in enumerate(PERTURBATIONS)}
        out["corruption_error"] = sum(errors.values()) / len(errors)
        out["flip_rate"] = sum(flips.values()) / len(flips)
        return {**out, **errors, **flips}


def relative(metrics: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """``mce`` and ``mfr``: the mean over kinds of the corruption error (flip rate) relative to the baseline's,
    in percent. A kind's mean over severities is its sum over them over 5, so its ratio is ImageNet-C's CE_c.
    Each only when both sides have every kind and the baseline's are all above 0."""
    out = {}
    for name, prefix, kinds in (("mce", "corruption_error_", CORRUPTIONS), ("mfr", "flip_rate_", PERTURBATIONS)):
        keys = [prefix + kind for kind in kinds]
        if all(k in metrics and baseline.get(k, 0) > 0 for k in keys):
            out[name] = 100 * sum(metrics[k] / baseline[k] for k in keys) / len(keys)
    return out


# Layout of Suite.counts.
_ERRORS = 2
_FLIPS = _ERRORS + len(CORRUPTIONS) * SEVERITIES
_SIZE = _FLIPS + len(PERTURBATIONS)


# --- pixels -------------------------------------------------------------------------------------------------


def _to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1] (channels-last in memory)."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 pixels of shape (N, H, W, 3), got {pixels.dtype} {tuple(pixels.shape)}")
    return pixels.permute(0, 3, 1, 2).float().div_(255)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float NCHW -> uint8 NHWC, clamped to [0, 1]; overwrites ``x``."""
    return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _corrupt(x: torch.Tensor, kind: str, severity: int, g: torch.Generator) -> torch.Tensor:
    if kind not in SEVERITY:
        raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= SEVERITIES:
        raise ValueError(f"severity {severity}: not in 1..{SEVERITIES}")
    params = {name: values[severity - 1] for name, values in SEVERITY[kind].items()}
    return _CORRUPT[kind](x, g, **params)


def _perturbed(x: torch.Tensor, kind: str, g: torch.Generator) -> Iterator[torch.Tensor]:
    """Frames 1 to FRAMES - 1 of a perturbation sequence of ``x`` (float NCHW)."""
    n, side, amount = len(x), x.shape[-1], PERTURBATION[kind]
    if kind == "translate":
        angle = torch.rand(n, generator=g, device=x.device) * (2 * math.pi)
        direction = torch.stack([angle.cos(), angle.sin()], dim=1) * (amount * side)
    elif kind == "rotate":
        sign = _signs(n, x.device, g)
    for j in range(1, FRAMES):
        t = j / (FRAMES - 1)
        if kind == "gaussian_noise":
            yield _gaussian_noise(x, g, amount)
        elif kind == "translate":
            # Whole pixels: shifting by p pixels moves the sampling grid by 2p / side.
            shift = (direction * t).round() * (2 / side)
            yield _warp(x, _eye(n, x.device), -shift, "reflection")
        elif kind == "rotate":
            yield _warp(x, _rotation(sign * math.radians(amount * t)), None, "zeros")
        elif kind == "scale":
            yield _warp(x, _eye(n, x.device) / (1 + (amount - 1) * t), None, "zeros")
        else:
            yield _brightness(x, g, shift=amount * t)


# --- corruptions: float NCHW in [0, 1] -> the same, unclamped -------------------------------------------------


def _random(x: torch.Tensor, g: torch.Generator, draw: Callable[..., torch.Tensor]) -> torch.Tensor:
    """A draw for each value of ``x``, laid out channels-last as the images (the draw is fast only when its
    tensor is contiguous)."""
    n, c, h, w = x.shape
    return draw(n, h, w, c, generator=g, device=x.device).permute(0, 3, 1, 2)


def _randn(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _random(x, g, torch.randn)


def _gaussian_noise(x: torch.Tensor, g: torch.Generator, sigma: float) -> torch.Tensor:
    return _randn(x, g).mul_(sigma).add_(x)


def _shot_noise(x: torch.Tensor, g: torch.Generator, photons: float) -> torch.Tensor:
    # Poisson counts of mean and variance x * photons, by the normal approximation rounded to whole photons:
    # torch.poisson costs 10 times as much on a CPU.
    mean = x * photons
    return _randn(x, g).mul_(mean.sqrt()).add_(mean).round_().clamp_(min=0).div_(photons)


def _impulse_noise(x: torch.Tensor, g: torch.Generator, amount: float) -> torch.Tensor:
    u = _random(x, g, torch.rand)
    return torch.where(u < amount, (u < amount / 2).to(x.dtype), x)


def _blur_scale(x: torch.Tensor) -> float:
    return math.sqrt(x.shape[-1] / 224)


def _taps(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Offsets -r..r of a kernel's taps, r = ceil(radius), at most what reflecting the edges allows."""
    r = min(math.ceil(radius), x.shape[-1] - 1, x.shape[-2] - 1)
    return torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)


def _gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.exp(-_taps(x, 3 * sigma).square() / (2 * sigma**2))
    return k / k.sum()


def _filter(x: torch.Tensor, *kernels: torch.Tensor) -> torch.Tensor:
    """Each channel of ``x`` convolved with each 2-D kernel (odd sides) in turn, edges reflected."""
    c = x.shape[1]
    h, w = (sum(k.shape[i] // 2 for k in kernels) for i in (0, 1))
    # Channels-last: a depthwise convolution on a CPU is several times faster so.
    x = F.pad(x.contiguous(memory_format=torch.channels_last), (w, w, h, h), mode="reflect")
    for k in kernels:
        x = F.conv2d(x, k.expand(c, 1, *k.shape), groups=c)
    return x


def _gaussian_blur(x: torch.Tensor, g: torch.Generator, sigma: float) -> torch.Tensor:
    k = _gaussian(x, sigma * _blur_scale(x))
    return _filter(x, k[None, :], k[:, None])


def _defocus_blur(x: torch.Tensor, g: torch.Generator, radius: float) -> torch.Tensor:
    r = radius * _blur_scale(x)
    t = _taps(x, r)
    # A disk with anti-aliased edges: each tap weighs the share of it inside the radius, roughly.
    disk = (r + 0.5 - torch.hypot(t[:, None], t[None, :])).clamp(0, 1)
    return _filter(x, disk / disk.sum())


def _contrast(x: torch.Tensor, g: torch.Generator, factor: float) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _brightness(x: torch.Tensor, g: torch.Generator, shift: float) -> torch.Tensor:
    # With hue and saturation kept, RGB is proportional to the HSV value (max of R, G, B); black turns grey.
    value = x.amax(dim=1, keepdim=True)
    brighter = (value + shift).clamp(max=1)
    return torch.where(value > 0, x * (brighter / value.clamp(min=1e-6)), brighter)


def _signs(n: int, device: torch.device, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=g, device=device).float() * 2 - 1


def _eye(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(2, device=device).expand(n, 2, 2)


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([torch.stack([cos, -sin], dim=1), torch.stack([sin, cos], dim=1)], dim=1)


def _points(x: torch.Tensor) -> torch.Tensor:
    """The centres of the pixels of ``x`` (H, W, 2: x then y), in grid_sample's coordinates, [-1, 1]."""
    ys, xs = ((torch.arange(n, device=x.device) * 2 + 1) / n - 1 for n in x.shape[-2:])
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)


def _sample(x: torch.Tensor, grid: torch.Tensor, padding: str) -> torch.Tensor:
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _warp(x: torch.Tensor, matrix: torch.Tensor, shift: torch.Tensor | None, padding: str) -> torch.Tensor:
    """Each output pixel p of ``x`` sampled at ``matrix @ p + shift`` (matrix N x 2 x 2, shift N x 2), in
    grid_sample's coordinates. As F.affine_grid, several times faster on a CPU."""
    grid = torch.einsum("hwj,nij->nhwi", _points(x), matrix)
    return _sample(x, grid if shift is None else grid + shift[:, None, None, :], padding)


def _affine(x: torch.Tensor, g: torch.Generator, degrees: float, shear: float, zoom: float) -> torch.Tensor:
    n = len(x)
    rotation = _rotation(_signs(n, x.device, g) * math.radians(degrees))
    shears = torch.zeros(n, 2, 2, device=x.device)
    shears[:, 0, 0] = shears[:, 1, 1] = 1
    shears[:, 0, 1] = _signs(n, x.device, g) * shear
    return _warp(x, rotation @ shears / zoom, None, "zeros")


def _elastic(x: torch.Tensor, g: torch.Generator, displacement: float, smoothness: float) -> torch.Tensor:
    n, side = len(x), x.shape[-1]
    grid = min(side, _ELASTIC_GRID)
    field = torch.randn(n, 2, grid, grid, generator=g, device=x.device)
    k = _gaussian(field, smoothness * grid)
    field = _filter(field, k[None, :], k[:, None])
    # A root-mean-square displacement of `displacement` times the side: twice that in grid_sample's units.
    field = field * (2 * displacement / field.square().mean(dim=(1, 2, 3), keepdim=True).sqrt())
    if field.shape[-2:] != x.shape[-2:]:
        field = F.interpolate(field, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return _sample(x, _points(x) + field.permute(0, 2, 3, 1), "reflection")


def _pixelate(x: torch.Tensor, g: torch.Generator, scale: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


_CORRUPT: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "affine": _affine,
    "elastic": _elastic,
    "pixelate": _pixelate,
}
