"""Labeling throughput: the whole pipeline against the model alone and against a plain PyTorch loop.

    .venv/bin/python bench/labeling_throughput.py

Three ways to label the same JPEG files (photo-like, 256x256, on local disk) with the same untrained timm
model (resnet18, 1,000 classes, 160x160 input), the same batch size and the same torch thread count:

- ``ceiling``: the model's forward pass (normalisation, forward, softmax top-k) on tensors decoded beforehand:
  what no pipeline can beat on this machine.
- ``plain``: the script a user would write: a ``Dataset`` that opens each JPEG with PIL and applies
  torchvision's Resize + CenterCrop + ToTensor + Normalize, a ``DataLoader`` with worker processes, the
  forward pass in the main process, predictions written to one Parquet file batch by batch.
- ``pipeline``: ``workers.labeling.label`` on a private 2-CPU Ray cluster, from a manifest of the files to
  predictions Parquet (read tasks, decode tasks, one teacher actor, write tasks, ledger).

Each is run in its own process, ``--repeats`` times, the ways interleaved within each repeat (A B C, then
C B A, ...) so that a machine whose speed drifts affects each about equally. Reported: the median rates, the
pipeline's ratio to each other way in every repeat, and the median of those per-repeat ratios (not the ratio
of the medians, which pairs figures from different moments of a drifting machine). Two figures per way:
``steady`` (images/s in steady state: the slope of images done against the time of each output batch, after
the first quarter of the images and before the last batch; the pipeline's outputs are dated by its ledger
entries, one per predictions file of ``--rows-per-file`` rows) and ``end_to_end`` (images over the whole
call: model loading and worker start included, and for the pipeline starting its actor and tasks, whose
processes import torch; not the start of the Ray cluster, nor the imports of the main process). ``cpu_seconds``:
the CPU time of each way's process and all its descendants over the same span (for the pipeline, every process
of its Ray cluster), with the processes that used most. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())


def commit_times(out: str) -> list[tuple[float, int]]:
    """(when, rows) of each commit of a labeling run into ``out``, in order: each ledger entry is written when
    its write task has committed its rows, so they date the outputs."""
    from curation import storage
    from workers import ledger

    entries = []
    for uri in storage.list_files(os.path.join(out, ledger.LEDGER), suffix=".json"):
        rows = sum(n for _, n in json.loads(Path(uri).read_text())["shards"])
        entries.append((os.stat(uri).st_mtime, rows))
    return sorted(entries)


def steady_rate(outputs: list[tuple[float, int]]) -> float | None:
    """Images per second in steady state from (time, images) of each output, in order: the least-squares
    slope of the images done against time over the outputs after the first quarter of the images (start-up,
    and the burst of the pipeline's first commits, which lag behind its first batches) and before the last."""
    import numpy as np

    times = np.array([t for t, _ in outputs], dtype=np.float64)
    done = np.cumsum([n for _, n in outputs])
    keep = (done >= done[-1] / 4) & (np.arange(len(done)) < len(done) - 1)
    if keep.sum() < 3:
        return None
    return float(np.polyfit(times[keep], done[keep], 1)[0])


def teacher_folder(arch: str, input_size: int, classes: int) -> str:
    """An untrained model folder (made once): the same weights for every way of labeling."""
    from trainer import models
    from trainer.models import ModelMeta

    uri = str(_common.DATA_DIR / f"teacher-{arch}-{input_size}-{classes}")
    if not os.path.exists(os.path.join(uri, models.META)):
        import torch

        torch.manual_seed(0)
        meta = ModelMeta(
            architecture=arch,
            class_names=[f"c{i}" for i in range(classes)],
            input_size=input_size,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        )
        model = models.create(meta)
        meta.parameters = models.count_parameters(model)
        models.save(model, meta, uri)
    return uri


# ---------------------------------------------------------------------------------------------- the phases


def phase_ceiling(args) -> dict:
    import numpy as np
    import torch

    from curation import imaging
    from trainer import models

    torch.set_num_threads(args.threads)
    cpu = _common.TreeCPU().start()
    t0 = time.perf_counter()
    model, meta = models.load(args.teacher)
    model = model.to(memory_format=torch.channels_last).eval()
    paths = json.loads(Path(args.paths).read_text())[: args.batch_size]
    pixels = torch.from_numpy(
        np.stack(
            [
                imaging.to_array(imaging.resize_square(imaging.decode_rgb(Path(p).read_bytes()), meta.input_size))
                for p in paths
            ]
        )
    )
    batches = -(-args.images // args.batch_size)
    outputs = []
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(batches):
            logits = model(models.normalize(pixels, meta))
            torch.softmax(logits.float(), dim=1).topk(5, dim=1)
            outputs.append((time.perf_counter(), args.batch_size))
    images = batches * args.batch_size
    cpu.stop()
    return {
        "images": images,
        "steady": steady_rate(outputs),
        "end_to_end": images / (outputs[-1][0] - t0),
        "compute_seconds": outputs[-1][0] - started,
        **cpu.report(args.cpus),
    }


def phase_plain(args) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from curation import schema, sources
    from trainer import models

    cpu = _common.TreeCPU().start()
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    model, meta = models.load(args.teacher)
    model = model.to(memory_format=torch.channels_last).eval()
    paths = json.loads(Path(args.paths).read_text())[: args.images]

    class Images(Dataset):
        def __init__(self, files):
            self.files = files
            self.transform = transforms.Compose(
                [
                    transforms.Resize(meta.input_size),
                    transforms.CenterCrop(meta.input_size),
                    transforms.ToTensor(),
                    transforms.Normalize(meta.mean, meta.std),
                ]
            )

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            with Image.open(self.files[i]) as img:
                return self.transform(img.convert("RGB")), i

    loader = DataLoader(Images(paths), batch_size=args.batch_size, num_workers=args.loader_workers)
    out = tempfile.mkdtemp(prefix="plain-", dir=args.scratch)
    writer = pq.ParquetWriter(os.path.join(out, "predictions.parquet"), schema.PREDICTIONS, compression="zstd")
    outputs, seen = [], 0
    with torch.inference_mode():
        for x, idx in loader:
            probs, classes = torch.softmax(model(x.contiguous(memory_format=torch.channels_last)), dim=1).topk(5, dim=1)
            probs, classes = probs.numpy(), classes.numpy().astype(np.int32)
            uris = [paths[i] for i in idx.tolist()]
            n = len(uris)
            offsets = pa.array(np.arange(0, (n + 1) * 5, 5, dtype=np.int32))
            writer.write_table(
                pa.table(
                    {
                        "image_id": pa.array(sources.image_ids(uris)),
                        "uri": pa.array(uris),
                        "label": pa.array(classes[:, 0]),
                        "confidence": pa.array(probs[:, 0]),
                        "topk_classes": pa.ListArray.from_arrays(offsets, pa.array(classes.ravel())),
                        "topk_probs": pa.ListArray.from_arrays(offsets, pa.array(probs.ravel().astype(np.float16))),
                        "teacher": pa.array(["plain"] * n),
                    },
                    schema=schema.PREDICTIONS,
                )
            )
            seen += n
            outputs.append((time.perf_counter(), n))
    writer.close()
    cpu.stop()
    return {
        "images": seen,
        "steady": steady_rate(outputs),
        "end_to_end": seen / (outputs[-1][0] - t0),
        **cpu.report(args.cpus),
    }


def phase_pipeline(args, **options) -> dict:
    """``workers.labeling.label`` on a private local cluster; ``options`` are more ``LabelConfig`` fields."""
    from workers.labeling import LabelConfig, has_gpus, label

    t0 = time.perf_counter()
    with _common.ray_cluster(num_cpus=args.cpus):
        cluster_seconds = time.perf_counter() - t0
        gpus = has_gpus()
        out = tempfile.mkdtemp(prefix="pipeline-", dir=args.scratch)
        config = LabelConfig(
            batch_size=args.batch_size, torch_threads=args.threads, rows_per_file=args.rows_per_file, **options
        )
        t1, started = time.perf_counter(), time.time()
        with _common.TreeCPU() as cpu:
            result = label(args.manifest, args.teacher, out, config, teacher_id="bench")
        wall = time.perf_counter() - t1
    entries = commit_times(out)
    return {
        "images": result.images,
        "predicted": result.predicted,
        "steady": steady_rate(entries),
        "end_to_end": result.images / wall,
        "cluster_start_seconds": cluster_seconds,
        "label_seconds": wall,
        # The job's start-up: from the call to its first committed file (the ledger entry's time).
        "first_commit_seconds": entries[0][0] - started if entries else None,
        "commits": len(entries),
        "cluster_gpus": gpus,
        **cpu.report(args.cpus),
    }


PHASES = {"ceiling": phase_ceiling, "plain": phase_plain, "pipeline": phase_pipeline}


# ------------------------------------------------------------------------------------------------- driver


def phase_inputs(args, prefix: str) -> list[str]:
    """The arguments every phase of a labeling benchmark takes: the JPEG pool (cached), an untrained teacher
    folder, the pool's manifest in a new scratch folder, and the shared settings."""
    paths = _common.jpeg_pool(f"jpeg-{args.source_size}", args.images, args.source_size, args.source_size)
    teacher = teacher_folder(args.arch, args.input_size, args.classes)
    scratch = tempfile.mkdtemp(prefix=prefix, dir=_common.DATA_DIR)
    paths_file = os.path.join(scratch, "paths.json")
    Path(paths_file).write_text(json.dumps(paths))
    manifest = _common.manifest(paths, os.path.join(scratch, "source.parquet"))
    return [
        *("--teacher", teacher, "--paths", paths_file, "--manifest", manifest, "--scratch", scratch),
        *("--images", str(args.images), "--batch-size", str(args.batch_size), "--threads", str(args.threads)),
        *("--cpus", str(args.cpus), "--rows-per-file", str(args.rows_per_file)),
    ]


def main() -> None:
    p = _common.labeling_arguments(
        __doc__, source_size=256, arch="resnet18", input_size=160, batch_size=128, rows_per_file=128
    )
    p.add_argument("--loader-workers", type=int, default=os.cpu_count(), help="DataLoader workers of the plain loop")
    p.add_argument("--ways", default="ceiling,plain,pipeline")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.phase:
        _common.phase_result(PHASES[args.phase](args))
        return

    machine = _common.machine()
    common = [*phase_inputs(args, "label-bench-"), "--loader-workers", str(args.loader_workers)]
    ways = args.ways.split(",")
    runs, loads = _common.interleaved(SCRIPT, ways, common, args.repeats)

    summary = {
        w: {k: _common.median([x[k] for x in runs[w]], 2) for k in ("steady", "end_to_end", "cpu_seconds")}
        for w in ways
    }
    ratios: dict[str, dict] = {}
    if "pipeline" in summary:
        for base in ("ceiling", "plain"):
            if base in summary:
                ratios[f"pipeline_vs_{base}"] = {}
                for k in ("steady", "end_to_end"):
                    r = _common.ratio(runs, "pipeline", base, k)
                    ratios[f"pipeline_vs_{base}"].update({k: r["median"], f"{k}_per_repeat": r["per_repeat"]})
    _common.emit(
        {
            "benchmark": "labeling_throughput",
            "machine": machine,
            "config": {
                **_common.labeling_config(args),
                "plain_loader_workers": args.loader_workers,
            },
            "images_per_second_median": summary,
            "ratios": ratios,
            "bar": {
                f"pipeline/{base} >= {bar} ({k})": (ratios.get(f"pipeline_vs_{base}", {}).get(k) or 0.0) >= bar
                for base, k, bar in (
                    ("ceiling", "steady", 0.8),
                    ("ceiling", "end_to_end", 0.85),
                    ("plain", "steady", 1.0),
                    ("plain", "end_to_end", 1.0),
                )
            },
            "load_average_before_each_run": loads,
            "runs": runs,
        }
    )


if __name__ == "__main__":
    main()
