"""Peak memory of labeling 20,000 images against 200,000: it must not grow with the number of images.

    .venv/bin/python bench/labeling_memory.py

Writes 200,000 tiny photo-like JPEGs (32x32) once, and two manifests: their first 20,000 and all of them.
Each size is labeled by ``workers.labeling.label`` (default LabelConfig) with a small untrained model
(timm ``test_resnet``, 32x32 input, 10 classes) on a fresh private 2-CPU Ray cluster in a child process,
while the parent sums the memory of that process and all its descendants (the driver, the GCS, the raylet,
every Ray worker and actor) every 0.2 s: RSS, and PSS, which counts a shared page (the object store) once.
``idle`` is the same child starting the cluster and loading the same modules without labeling anything.
Each size is run ``--repeats`` times, in turn; medians are reported. Prints JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())


def teacher_folder() -> str:
    from trainer import models
    from trainer.models import ModelMeta

    uri = str(_common.DATA_DIR / "teacher-test_resnet-32-10")
    if not os.path.exists(os.path.join(uri, models.META)):
        meta = ModelMeta(
            architecture="test_resnet",
            class_names=[str(i) for i in range(10)],
            input_size=32,
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
        )
        model = models.create(meta)
        meta.parameters = models.count_parameters(model)
        models.save(model, meta, uri)
    return uri


def phase(args) -> dict:
    from workers.labeling import LabelConfig, label

    t0 = time.perf_counter()
    with _common.ray_cluster(num_cpus=args.cpus):
        cluster_seconds = time.perf_counter() - t0
        if args.manifest == "idle":
            time.sleep(5)
            return {"images": 0, "cluster_start_seconds": cluster_seconds}
        out = tempfile.mkdtemp(prefix="labels-", dir=args.scratch)
        t1 = time.perf_counter()
        result = label(args.manifest, args.teacher, out, LabelConfig(), teacher_id="bench")
        wall = time.perf_counter() - t1
    return {
        "images": result.images,
        "predicted": result.predicted,
        "label_seconds": wall,
        "images_per_second": result.images / wall,
        "cluster_start_seconds": cluster_seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=20_000)
    p.add_argument("--large", type=int, default=200_000)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--phase", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        _common.phase_result(phase(args))
        return

    machine = _common.machine()
    paths = _common.jpeg_pool("jpeg-32", args.large, 32, 32)
    teacher = teacher_folder()
    scratch = tempfile.mkdtemp(prefix="memory-bench-", dir=_common.DATA_DIR)
    manifests = {"idle": "idle"}
    for n in (args.small, args.large):
        manifests[n] = _common.manifest(paths[:n], os.path.join(scratch, f"source-{n}.parquet"))
    runs: dict[str, list[dict]] = {str(k): [] for k in manifests}
    for r in range(args.repeats):
        for key, uri in manifests.items():
            load = _common.load()
            result = _common.run_phase(
                SCRIPT,
                ["--phase", "--manifest", uri, "--teacher", teacher, "--scratch", scratch, "--cpus", str(args.cpus)],
                memory=True,
            )
            result["load_average_before"] = load
            runs[str(key)].append(result)
            print(f"repeat {r + 1} {key}: {result['memory']} (load {load})", file=sys.stderr, flush=True)

    def med(key: str, field: str) -> float:
        return _common.median([x["memory"][field] for x in runs[key]])

    small, large = str(args.small), str(args.large)
    summary = {k: {"peak_rss_mib": med(k, "peak_rss_mib"), "peak_pss_mib": med(k, "peak_pss_mib")} for k in runs}
    for k in (small, large):
        summary[k]["images_per_second"] = _common.median([x["images_per_second"] for x in runs[k]], 1)
    growth = {f: round(summary[large][f] / summary[small][f] - 1, 4) for f in ("peak_rss_mib", "peak_pss_mib")}
    _common.emit(
        {
            "benchmark": "labeling_memory",
            "machine": machine,
            "config": {
                "images": [args.small, args.large],
                "source": "32x32 JPEG",
                "model": "test_resnet",
                "input_size": 32,
                "classes": 10,
                "label_config": "defaults",
                "ray_cpus": args.cpus,
                "repeats": args.repeats,
                "sample_seconds": _common.SAMPLE_SECONDS,
            },
            "median": summary,
            "growth_large_vs_small": growth,
            "bar": {"peak RSS within 15%": abs(growth["peak_rss_mib"]) <= 0.15},
            "runs": runs,
        }
    )


if __name__ == "__main__":
    main()
