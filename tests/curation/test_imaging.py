"""Decoding one image: what is kept comes out with its real range, orientation and colours; everything else is
a reject with its reason, and nothing else ever leaves decode_for_model."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from curation import imaging
from curation.imaging import DecodeConfig, RejectedImage, decode_for_model, decode_rgb
from tests import helpers


def reason_of(data: bytes, config: DecodeConfig | None = None, size: int = 32) -> str:
    try:
        decode_for_model(data, size, config=config)
    except RejectedImage as e:
        assert e.detail
        return e.reason
    return ""


@pytest.mark.parametrize("name", list(helpers.EDGE_FILES))
def test_every_edge_file_has_its_outcome(name):
    make, expected = helpers.EDGE_FILES[name]
    assert reason_of(make(np.random.default_rng(0))) == expected


def test_long_strips_are_bad_geometry_before_any_pixel_is_decoded():
    tall = helpers.EDGE_FILES["strip-1x1000000.png"][0](None)
    assert len(tall) < 4096  # a 1 x 1,000,000 PNG takes 2 kB; resized to 32 px wide it would be 32 x 32,000,000
    with pytest.raises(RejectedImage, match="1 x 1000000 pixels, aspect ratio over the cap of 50") as e:
        decode_for_model(tall, 32)
    assert e.value.reason == imaging.BAD_GEOMETRY


def test_caps_are_configurable():
    strip = helpers._save(Image.new("L", (60, 1)), "PNG")
    assert reason_of(strip) == imaging.BAD_GEOMETRY
    assert reason_of(strip, DecodeConfig(max_aspect_ratio=60)) == ""
    square = helpers._save(Image.new("L", (100, 100)), "PNG")
    assert reason_of(square, DecodeConfig(max_pixels=9_999)) == imaging.TOO_LARGE
    assert reason_of(square, DecodeConfig(max_pixels=10_000)) == ""
    with pytest.raises(ValueError):
        DecodeConfig(max_aspect_ratio=0.5)


def test_bomb_is_too_large_from_its_header():
    bomb = helpers.png_bomb()
    assert len(bomb) < 20_000
    with pytest.raises(RejectedImage, match="100000 x 100000 pixels, over the cap of 100000000") as e:
        decode_rgb(bomb)
    assert e.value.reason == imaging.TOO_LARGE


def test_16_bit_png_keeps_its_range():
    img = decode_rgb(helpers.png_16bit())
    pixels = np.asarray(img)
    assert img.mode == "RGB" and pixels.shape == (16, 16, 3)
    # 257 * k scales to exactly k: 0..255, mean 127.5 (clipping to 8 bits would make nearly all of it 255)
    assert pixels[..., 0].ravel().tolist() == list(range(256))
    assert pixels.mean() == 127.5
    assert decode_for_model(helpers.png_16bit(), 16).mean() == 127.5


def test_exif_orientation_is_applied():
    img = decode_rgb(helpers.jpeg_with_orientation())
    assert img.size == (20, 40)  # stored 40 x 20, shown rotated
    pixels = np.asarray(img).astype(int)
    top, bottom = pixels[:18].mean(axis=(0, 1)), pixels[22:].mean(axis=(0, 1))
    assert top[0] > 240 and top[2] < 15  # red on top
    assert bottom[2] > 240 and bottom[0] < 15  # blue below


def _photo(w: int, h: int, fmt: str = "JPEG", orientation: int = 1) -> bytes:
    """Smooth gradients, which a JPEG keeps as it keeps a photo."""
    y, x = np.mgrid[0:h, 0:w]
    channels = [255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 37) * np.cos(y / 23)]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.stack(channels, -1).astype(np.uint8)).save(buf, fmt, quality=90, exif=exif)
    return buf.getvalue()


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_never_below_the_size_needed():
    data = _photo(1024, 768)
    assert decode_rgb(data).size == (1024, 768)
    assert decode_rgb(data, shorter_side=90).size == (128, 96)  # 1/8: both sides still at least 90
    assert decode_rgb(data, shorter_side=200).size == (512, 384)  # 1/4 would give 192
    assert decode_rgb(data, shorter_side=500).size == (1024, 768)  # not twice as large as needed
    assert decode_rgb(data, DecodeConfig(draft=False), shorter_side=90).size == (1024, 768)
    assert decode_rgb(_photo(1024, 768, "PNG"), shorter_side=90).size == (1024, 768)  # JPEGs only
    # stored 1024 x 512, shown rotated: reduced, then turned
    assert decode_rgb(_photo(1024, 512, orientation=6), shorter_side=100).size == (128, 256)
    # what the model gets: the full decode's picture, to within rounding
    drafted = decode_for_model(data, 64, 0.875).astype(int)
    full = decode_for_model(data, 64, 0.875, DecodeConfig(draft=False)).astype(int)
    assert drafted.shape == full.shape == (64, 64, 3) and np.abs(drafted - full).mean() < 1.0


def test_transparent_palette_png_is_composited_on_the_background():
    pixels = np.asarray(decode_rgb(helpers.palette_png_with_transparency()))
    assert (pixels[:, :4] == (255, 255, 255)).all()  # transparent: the default white background
    assert (pixels[:, 4:] == (255, 0, 0)).all()
    grey = np.asarray(decode_rgb(helpers.palette_png_with_transparency(), DecodeConfig(background=(128, 128, 128))))
    assert (grey[:, :4] == (128, 128, 128)).all() and (grey[:, 4:] == (255, 0, 0)).all()


def test_half_transparent_rgba_is_blended():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    pixels = np.asarray(decode_rgb(helpers._save(img, "PNG"), DecodeConfig(background=(200, 100, 0))))
    assert pixels[0, 0].tolist() == [100, 50, 0]  # 200 * 127/255 = 99.6, 100 * 127/255 = 49.8, rounded


def test_cmyk_jpeg_and_animated_gif_are_kept():
    red = np.asarray(decode_rgb(helpers.cmyk_jpeg())).astype(int)
    assert red.shape == (16, 16, 3) and (red[..., 0] > 240).all() and (red[..., 1:] < 15).all()
    first = np.asarray(decode_rgb(helpers.animated_gif()))
    assert (first == (255, 0, 0)).all()  # the first frame, red; the second is blue


def test_damaged_exif_keeps_the_pixels():
    pixels = np.full((8, 8, 3), 90, np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = bytearray(helpers._save(Image.fromarray(pixels), "JPEG", exif=exif))
    at = data.index(b"Exif\0\0") + 6
    data[at : at + 8] = b"\xff" * 8  # the TIFF header inside the EXIF block: neither II nor MM
    img = decode_rgb(bytes(data))
    assert img.size == (8, 8) and abs(np.asarray(img).astype(int).mean() - 90) < 3


def test_a_transform_that_fails_is_the_image_s_reject():
    def boom(img):
        raise MemoryError("out of memory in the augmentation")

    good = helpers.image_bytes(np.random.default_rng(0))
    with pytest.raises(RejectedImage) as e:
        decode_for_model(good, 32, transform=boom)
    assert e.value.reason == imaging.TOO_LARGE and "MemoryError" in e.value.detail

    def bug(img):
        raise KeyError("x")

    with pytest.raises(RejectedImage) as e:
        decode_for_model(good, 32, transform=bug)
    assert e.value.reason == imaging.CORRUPT and "KeyError" in e.value.detail


def test_new_reasons_keep_the_old_indices():
    # training batches carry a reject as its index in REJECT_REASONS
    assert imaging.REJECT_REASONS[:4] == ("missing", "empty", "not_an_image", "corrupt")
    assert set(helpers.EDGE_FILES[n][1] for n in helpers.EDGE_FILES) - {""} <= set(imaging.REJECT_REASONS)


@pytest.mark.parametrize(
    ("width", "height", "size", "crop_pct"),
    [(256, 256, 160, 0.875), (500, 375, 224, 1.0), (375, 500, 224, 0.875), (57, 181, 64, 0.9), (1000, 80, 64, 1.0)],
)
def test_resizing_only_the_crop_gives_the_pixels_of_resizing_the_whole_image(width, height, size, crop_pct):
    # The centred crop is resized alone (PIL's box); the reference resizes the whole image, then crops.
    rng = np.random.default_rng(width * height)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
    scale = size / crop_pct / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (w - size) // 2, (h - size) // 2
    want = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR).crop((left, top, left + size, top + size)))
    got = imaging.to_array(imaging.resize_square(img, size, crop_pct))
    diff = np.abs(got.astype(int) - want.astype(int))
    assert got.shape == (size, size, 3)
    assert diff.max() <= 2 and diff.mean() < 0.2


def test_an_image_already_at_the_resize_size_is_only_cropped():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 300, 3), dtype=np.uint8))
    got = imaging.to_array(imaging.resize_square(img, 224, 0.875))  # shorter side 256 = 224 / 0.875
    assert np.array_equal(got, np.asarray(img)[16:240, 38:262])
