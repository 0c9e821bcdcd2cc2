"""Cost model: GPUs, CPUs and hours to label 300M images, from the measured decode cost and GPU figures.

    .venv/bin/python bench/cost_model.py [--images 300e6] [--gpu-images-per-second 10000] [--hours 24]

Measured here (this machine, one process, one thread): the CPU time per image of what the labeling job does
on the CPU side for a ResNet-50-sized teacher: read the file, decode the JPEG, resize and crop to 224x224
(``workers.labeling.read_and_decode``), on photo-like JPEGs of ImageNet's typical size (500x375, quality 90).
With ``--sizes``, the same cost for larger photos too, with JPEG draft decoding (``DecodeConfig.draft``, the
default: a JPEG at least twice the size needed is decoded at 1/2, 1/4 or 1/8 scale) and without it, and the
mean absolute difference between the two ways' pixels.

Assumed (published figures, not measured here; see docs/benchmarks.md):
- GPU throughput of the teacher's forward pass, ResNet-50 at 224x224, mixed precision, batch 256, PyTorch:
  T4 1,198 img/s and V100 3,382 img/s (NVIDIA DeepLearningExamples, ResNet50 v1.5 for PyTorch); an H100 is
  taken as about 3x a V100, 10,000 img/s (override with --gpu-images-per-second).
- CPU work per image besides decoding (Ray Data scheduling, the object store, top-k and Parquet writing,
  S3 request handling): ``--overhead`` times the decode cost (default 1.25).
- Mean JPEG size 110 KB (ImageNet's), for the bytes read from object storage.

Prints JSON: the measured cost, then for a few cluster shapes the hours, and which resource binds.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

# ResNet-50 v1.5, PyTorch, mixed precision, batch 256, images/s per GPU (NVIDIA DeepLearningExamples README).
PUBLISHED = {"T4": 1198, "V100": 3382}
# Our assumption for an H100 (SXM) in PyTorch bf16 with channels_last: about 3x a V100.
H100_ASSUMED = 10_000
# vCPUs per GPU of common GPU nodes: AWS p5.48xlarge (8x H100, 192 vCPUs); g4dn.12xlarge (4x T4, 48 vCPUs).
VCPUS_PER_GPU = {"H100": 24, "T4": 12}
MEAN_JPEG_BYTES = 110_000


def decode_cost(count: int, width: int, height: int, size: int, *, draft: bool = True) -> dict:
    """Seconds of one CPU per image for read + decode + resize/crop, over ``count`` photo-like JPEGs; and the
    pixels of the last pass."""
    import numpy as np

    from curation.imaging import DecodeConfig
    from workers.labeling import read_and_decode

    paths = _common.jpeg_pool(f"jpeg-{width}x{height}", count, width, height)
    batch = {"image_id": np.arange(len(paths)), "uri": np.array(paths, dtype=object)}
    decode = DecodeConfig(draft=draft)
    read_and_decode({k: v[:8] for k, v in batch.items()}, size=size, crop_pct=1.0)  # warm the imports
    times = []
    for _ in range(3):
        t = time.process_time()
        out = read_and_decode(batch, size=size, crop_pct=1.0, decode=decode)
        times.append((time.process_time() - t) / len(paths))
    return {
        "seconds_per_image": _common.median(times),
        "images": len(paths),
        "mean_file_bytes": int(sum(os.path.getsize(p) for p in paths) / len(paths)),
        "pixels": out["pixels"],
    }


def by_source_size(sizes: list[tuple[int, int]], sample: int, size: int) -> list[dict]:
    """Decode cost per source size, drafted and not (fewer images for larger sources: about as many pixels
    as ``sample`` images of 500x375)."""
    rows = []
    for w, h in sizes:
        count = max(16, round(sample * 500 * 375 / (w * h)))
        full, drafted = (decode_cost(count, w, h, size, draft=d) for d in (False, True))
        rows.append(
            {
                "source": f"{w}x{h}",
                "images": count,
                "full_ms_per_image": round(full["seconds_per_image"] * 1e3, 2),
                "draft_ms_per_image": round(drafted["seconds_per_image"] * 1e3, 2),
                "speed_up": round(full["seconds_per_image"] / drafted["seconds_per_image"], 2),
                "mean_abs_pixel_difference": round(
                    float(abs(full["pixels"].astype(int) - drafted["pixels"].astype(int)).mean()), 3
                ),
            }
        )
    return rows


def plan(images: float, gpu_rate: float, cpu_seconds: float, gpus: int, vcpus_per_gpu: int) -> dict:
    """Hours for ``gpus`` GPUs with ``vcpus_per_gpu`` each, and which resource binds."""
    gpu_side = gpus * gpu_rate
    cpu_side = gpus * vcpus_per_gpu / cpu_seconds
    rate = min(gpu_side, cpu_side)
    return {
        "gpus": gpus,
        "vcpus": gpus * vcpus_per_gpu,
        "gpu_bound_images_per_second": round(gpu_side),
        "cpu_bound_images_per_second": round(cpu_side),
        "bottleneck": "GPU" if gpu_side <= cpu_side else "CPU (decode)",
        "hours": round(images / rate / 3600, 1),
        "vcpus_to_keep_the_gpus_busy": math.ceil(gpu_side * cpu_seconds),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=float, default=300e6)
    p.add_argument("--gpu-images-per-second", type=float, default=H100_ASSUMED, help="one H100, teacher forward")
    p.add_argument("--overhead", type=float, default=1.25, help="CPU time per image / decode time per image")
    p.add_argument("--hours", type=float, default=24.0, help="target wall time for the sizing")
    p.add_argument("--sample", type=int, default=300, help="JPEGs decoded to measure the cost")
    p.add_argument(
        "--sizes",
        default="500x375,1024x768,2048x1536,4032x3024",
        help="source sizes (WxH, comma-separated) whose decode cost is measured drafted and not; '' for none",
    )
    args = p.parse_args()
    sizes = [(int(w), int(h)) for w, h in (s.split("x") for s in args.sizes.split(",") if s)]

    measured = decode_cost(args.sample, 500, 375, 224)
    cpu_seconds = measured["seconds_per_image"] * args.overhead
    rates = {"H100": args.gpu_images_per_second, "T4": PUBLISHED["T4"]}
    shapes = {
        gpu: [plan(args.images, rates[gpu], cpu_seconds, n, VCPUS_PER_GPU[gpu]) for n in (1, 8, 32)] for gpu in rates
    }
    target_rate = args.images / (args.hours * 3600)
    sizing = {}
    for gpu, rate in rates.items():
        gpus = math.ceil(target_rate / rate)
        vcpus = math.ceil(target_rate * cpu_seconds)
        sizing[gpu] = {
            "gpus": gpus,
            "vcpus": vcpus,
            "vcpus_per_gpu": round(vcpus / gpus, 1),
            "gpu_utilisation": round(target_rate / (gpus * rate), 2),
        }
    _common.emit(
        {
            "benchmark": "cost_model",
            "machine": _common.machine(),
            "measured": {
                "decode_resize_224_cpu_seconds_per_image": round(measured["seconds_per_image"], 5),
                "sample_images": measured["images"],
                "sample_mean_file_bytes": measured["mean_file_bytes"],
                "source": "500x375 photo-like JPEG, q90, one thread",
                "by_source_size": by_source_size(sizes, args.sample, 224),
            },
            "assumed": {
                "gpu_images_per_second": rates,
                "published_resnet50_amp_bs256": PUBLISHED,
                "cpu_overhead_factor": args.overhead,
                "vcpus_per_gpu_of_gpu_nodes": VCPUS_PER_GPU,
                "mean_jpeg_bytes": MEAN_JPEG_BYTES,
            },
            "cpu_seconds_per_image": round(cpu_seconds, 5),
            "images": args.images,
            "gpu_hours": {gpu: round(args.images / rate / 3600, 1) for gpu, rate in rates.items()},
            "vcpu_hours": round(args.images * cpu_seconds / 3600),
            "bytes_read_tb": round(args.images * MEAN_JPEG_BYTES / 1e12, 1),
            "cluster_shapes": shapes,
            f"sized_for_{args.hours:g}_hours": {
                "images_per_second": round(target_rate),
                **sizing,
                "read_gbit_per_second": round(target_rate * MEAN_JPEG_BYTES * 8 / 1e9, 1),
                "s3_get_per_second": round(target_rate),
            },
        }
    )


if __name__ == "__main__":
    main()
