"""Decoding on the teacher's device gives the labels the CPU path gives.

The same decode task and teacher actor code runs both ways, in process: once with every image decoded on the
CPU (``imaging.decode_for_model``), once with eligible JPEGs passed through and decoded by
``torchvision.io.decode_jpeg`` on the actor's device. Without a GPU the device is the CPU (torchvision's
libjpeg-turbo), which checks the plumbing, the fallbacks and the resize; the ``gpu`` test runs it on CUDA
(nvJPEG)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageDraw

from curation import imaging, schema
from tests import helpers
from workers import labeling

SIZE = 64


def _scene(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth gradients with a few filled shapes: structure a JPEG keeps, unlike noise."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([x, y, 1 - x * y], -1) * rng.uniform(80, 255, 3)
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        draw.ellipse(
            (x0, y0, x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))),
            fill=tuple(int(c) for c in rng.integers(0, 255, 3)),
        )
    return img


def _corpus(root: Path, n: int = 48) -> list[str]:
    """Baseline JPEGs of several sizes, qualities and subsamplings (the device's), and the files the CPU path
    must keep: progressive, EXIF-rotated, CMYK, greyscale, PNG, a truncated JPEG (a reject)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = _scene(rng, int(rng.integers(48, 300)), int(rng.integers(48, 300)))
        buf = io.BytesIO()
        kind = ["baseline", "baseline", "baseline-444", "progressive", "exif6", "cmyk", "grey", "png"][i % 8]
        if kind == "baseline":
            img.save(buf, "JPEG", quality=int(rng.integers(60, 96)))
        elif kind == "baseline-444":
            img.save(buf, "JPEG", quality=90, subsampling=0)
        elif kind == "progressive":
            img.save(buf, "JPEG", quality=85, progressive=True)
        elif kind == "exif6":
            exif = Image.Exif()
            exif[0x0112] = 6
            img.save(buf, "JPEG", quality=85, exif=exif)
        elif kind == "cmyk":
            img.convert("CMYK").save(buf, "JPEG", quality=90)
        elif kind == "grey":
            img.convert("L").save(buf, "JPEG", quality=90)
        else:
            img.save(buf, "PNG")
        path = root / f"{i:03d}-{kind}.{'png' if kind == 'png' else 'jpg'}"
        path.write_bytes(buf.getvalue())
        paths.append(str(path))
    truncated = root / "truncated.jpg"
    truncated.write_bytes(Path(paths[0]).read_bytes()[:-300])
    return [*paths, str(truncated)]


def _teacher(uri: str, paths: list[str]) -> str:
    """A test_resnet fitted for a few steps to tell the corpus's images apart by their dominant colour channel:
    a teacher with clear margins, as a trained one has (an untrained head is almost uniform, and any rounding
    would flip its near-ties)."""
    from trainer import models

    torch.manual_seed(0)
    meta = helpers.untrained_model(uri, classes=3, input_size=SIZE)
    model, _ = models.load(uri)
    batch = {"image_id": np.arange(len(paths), dtype=np.int64), "uri": np.array(paths, dtype=object)}
    decoded = labeling.read_and_decode(batch, size=SIZE, crop_pct=0.875)
    keep = decoded["reason"] == ""
    pixels = torch.from_numpy(decoded["pixels"][keep])
    target = pixels.float().mean(dim=(1, 2)).argmax(dim=1)
    x = models.normalize(pixels, meta)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    models.save(model.eval(), meta, uri)
    return uri


def _label(paths: list[str], model_uri: str, device_decode: bool) -> tuple[pa.Table, dict[str, np.ndarray]]:
    batch = {"image_id": np.arange(len(paths), dtype=np.int64), "uri": np.array(paths, dtype=object)}
    decoded = labeling.read_and_decode(batch, size=SIZE, crop_pct=0.875, device_decode=device_decode)
    teacher = labeling.TeacherPredictor(model_uri, "t", top_k=3, torch_threads=2)
    return teacher(decoded), decoded


def _check_same_labels(tmp_path: Path) -> tuple[pa.Table, pa.Table]:
    (tmp_path / "pool").mkdir()
    paths = _corpus(tmp_path / "pool")
    model_uri = _teacher(str(tmp_path / "model"), paths)
    cpu, cpu_batch = _label(paths, model_uri, device_decode=False)
    dev, dev_batch = _label(paths, model_uri, device_decode=True)

    # The baseline JPEGs, and only they, went to the device; the truncated one was rejected as on the CPU.
    on_device = [p for p, d in zip(paths, dev_batch["on_device"], strict=True) if d]
    assert on_device and all("baseline" in p for p in on_device)
    assert len(on_device) == sum("baseline" in p for p in paths)
    assert cpu.column("reason").to_pylist() == dev.column("reason").to_pylist()
    assert cpu.column("reason").to_pylist()[-1] == imaging.CORRUPT
    assert dev.select(schema.PREDICTIONS.names).cast(schema.PREDICTIONS).num_rows == len(paths)

    # Same top-1 for every image; the confidences differ by the decoders' rounding only.
    assert cpu.column("label").to_pylist() == dev.column("label").to_pylist()
    np.testing.assert_allclose(dev.column("confidence").to_numpy(), cpu.column("confidence").to_numpy(), atol=0.05)
    return cpu, dev


def test_device_path_labels_as_the_cpu_path(tmp_path: Path) -> None:
    _check_same_labels(tmp_path)


def test_device_decode_blocks_carry_bytes_or_pixels_never_zeros(tmp_path: Path) -> None:
    # A passed-through JPEG travels as its file's bytes, a CPU-decoded image as its pixels, a reject as nothing:
    # the block has no pixels column of zeros for the rows the device will decode.
    paths = _corpus(tmp_path)
    batch = {"image_id": np.arange(len(paths), dtype=np.int64), "uri": np.array(paths, dtype=object)}
    cpu = labeling.read_and_decode(batch, size=SIZE, crop_pct=0.875)
    dev = labeling.read_and_decode(batch, size=SIZE, crop_pct=0.875, device_decode=True)
    assert "pixels" not in dev and set(dev) >= {"data", "on_device", "reason"}
    for i, path in enumerate(paths):
        if dev["on_device"][i]:
            assert dev["data"][i] == Path(path).read_bytes()
        elif dev["reason"][i]:
            assert dev["data"][i] == b"" and dev["reason"][i] == cpu["reason"][i]
        else:
            assert dev["data"][i] == cpu["pixels"][i].tobytes()
    assert int(dev["on_device"].sum()) == sum("baseline" in p for p in paths)


def test_device_resize_matches_pil(tmp_path: Path) -> None:
    # The device's resize and crop against imaging.decode_for_model's, pixel by pixel, on the same decoder.
    # Images of one size are resized together: two sizes come twice, with different content, interleaved.
    rng = np.random.default_rng(1)
    datas = []
    for w, h in ((300, 200), (64, 64), (57, 181), (300, 200), (640, 480), (64, 64)):
        buf = io.BytesIO()
        _scene(rng, w, h).save(buf, "JPEG", quality=92)
        datas.append(buf.getvalue())
    pixels, verdicts = labeling.decode_on_device(datas, SIZE, 0.875, torch.device("cpu"))
    assert verdicts == [("", "")] * len(datas)
    for got, data in zip(pixels.numpy(), datas, strict=True):
        # (the device decodes at full size: so does the CPU here, without draft decoding)
        want = imaging.decode_for_model(data, SIZE, 0.875, imaging.DecodeConfig(draft=False))
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 8


def test_device_decoder_failure_falls_back_to_the_cpu_reason() -> None:
    buf = io.BytesIO()
    _scene(np.random.default_rng(2), 80, 80).save(buf, "JPEG")
    good = buf.getvalue()
    broken = good[:200] + b"\xff\xd9"  # a baseline header and EOI, with the scan cut: ends in the CPU fallback
    pixels, verdicts = labeling.decode_on_device([good, broken], SIZE, 1.0, torch.device("cpu"))
    assert verdicts[0] == ("", "") and pixels[0].float().mean() > 0
    # Whatever the decoders make of it, the result is the CPU path's: its pixels or its reject.
    try:
        want = imaging.decode_for_model(broken, SIZE, 1.0)
    except imaging.RejectedImage as e:
        assert verdicts[1][0] == e.reason
    else:
        assert verdicts[1] == ("", "")
        assert np.abs(pixels[1].numpy().astype(int) - want.astype(int)).mean() < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decoding_labels_as_the_cpu_path(tmp_path: Path) -> None:
    cpu, dev = _check_same_labels(tmp_path)
    assert labeling.TeacherPredictor(str(tmp_path / "model"), "t", 1, None).device.type == "cuda"


def test_device_decode_blocks_travel_through_ray_data(tmp_path: Path, ray_cluster) -> None:
    # The decode tasks' device-decoding blocks (bytes or pixels in one binary column, no pixels column) through
    # Ray Data's tasks, blocks and a teacher actor, as labeling runs them; the device is this machine's CPU.
    import ray

    (tmp_path / "pool").mkdir()
    paths = _corpus(tmp_path / "pool")
    model_uri = _teacher(str(tmp_path / "model"), paths)
    cpu, _ = _label(paths, model_uri, device_decode=False)

    items = [{"image_id": i, "uri": p} for i, p in enumerate(paths)]
    labeled = (
        ray.data.from_items(items, override_num_blocks=4)
        .map_batches(
            labeling.read_and_decode,
            batch_size=16,
            batch_format="numpy",
            fn_kwargs={"size": SIZE, "crop_pct": 0.875, "device_decode": True},
        )
        .map_batches(
            labeling.TeacherPredictor,
            fn_constructor_kwargs={"model_uri": model_uri, "teacher_id": "t", "top_k": 3, "torch_threads": 1},
            batch_size=32,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.5,
        )
    )
    rows = sorted(labeled.take_all(), key=lambda r: r["image_id"])
    assert [r["image_id"] for r in rows] == list(range(len(paths)))
    assert [r["reason"] for r in rows] == cpu.column("reason").to_pylist()
    assert [r["label"] for r in rows] == cpu.column("label").to_pylist()
