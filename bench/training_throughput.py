"""Training throughput: the noisy student under Ray Train against a plain PyTorch loop.

    .venv/bin/python bench/training_throughput.py

Both train the same untrained timm model (resnet18, 1,000 classes, 112x112 input, dropout 0.3, stochastic
depth 0.2) with the same recipe (AdamW, cosine schedule with warm-up, EMA, soft-target cross-entropy, the
same torch thread count) on the same data: each step 16 labeled images (a labeled set of 256 photo-like
256x256 JPEGs, smoothed hard targets) and 48 pseudo-labeled ones (a curated manifest with top-5 soft labels,
one pass: 3,136 JPEGs for 60 steps), every image decoded, resized and noised with RandAugment (2 ops, magnitude 9).

- ``ray``: ``trainer.train.train`` (Ray Data streams decoding and noising, one Ray Train worker) on a private
  2-CPU Ray cluster; the throughput is the trainer's own ``train_steady_images_per_second``.
- ``plain``: what a user would write: two ``Dataset``s that decode and noise each image with the same
  functions, two shuffling ``DataLoader``s with worker processes, the same model, optimizer, schedule and EMA.

``steady`` counts images per second after the first 5 steps (start-up excluded: data loaders filling, Ray
Data starting its tasks), up to the last optimizer step. ``total_seconds`` is the whole call (for Ray:
``train()``, with its final checkpoint, the evaluation of 64 images and the model folder; the cluster is
already up) and ``fixed_seconds`` what it took beyond the images at the steady rate: start-up and wind-down.
``cpu_seconds`` is the CPU time of the process and all its descendants (for Ray, every process of the cluster)
over the call, with the processes that used most. Each way runs in its own process, ``--repeats`` times,
interleaved (A B, then B A, ...); medians are reported, and Ray's steady rate over the plain loop's in each
repeat with the median of those. Prints JSON.
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
CLASSES = 1000
TOP_K = 5


def train_config(args):
    from trainer.config import TrainConfig

    return TrainConfig(
        architecture=args.arch,
        input_size=args.input_size,
        steps=args.steps,
        batch_size=args.batch_size,
        unlabeled_ratio=3.0,
        warmup_steps=5,
        checkpoint_every=args.steps,
        torch_threads=args.threads,
        cpus_per_worker=args.cpus_per_worker,
        # The robustness suites are evaluation work (about 100 forward passes per test image), not start-up: off,
        # as in the plain loop; their cost is reported in docs/benchmarks.md.
        robustness_images=0,
        seed=0,
    )


def write_inputs(paths: list[str], scratch: str, labeled: int, pseudo: int) -> dict[str, str]:
    """The labeled set (uri, label) and a curated pseudo-label manifest (uri, label, top-k, copies)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    lab = pa.table({"uri": pa.array(paths[:labeled]), "label": pa.array(np.arange(labeled) % CLASSES, pa.int32())})
    uris = paths[labeled : labeled + pseudo]
    classes = rng.integers(0, CLASSES, (len(uris), TOP_K)).astype(np.int32)
    probs = np.sort(rng.dirichlet(np.ones(TOP_K), len(uris)), axis=1)[:, ::-1].astype(np.float16)
    offsets = pa.array(np.arange(0, (len(uris) + 1) * TOP_K, TOP_K, dtype=np.int32))
    manifest = pa.table(
        {
            "uri": pa.array(uris),
            "label": pa.array(classes[:, 0]),
            "topk_classes": pa.ListArray.from_arrays(offsets, pa.array(classes.ravel())),
            "topk_probs": pa.ListArray.from_arrays(offsets, pa.array(probs.ravel())),
            "copies": pa.array(np.ones(len(uris), np.int32)),
        }
    )
    out = {"labeled": os.path.join(scratch, "labeled.parquet"), "manifest": os.path.join(scratch, "manifest")}
    pq.write_table(lab, out["labeled"])
    os.makedirs(out["manifest"], exist_ok=True)
    pq.write_table(manifest, os.path.join(out["manifest"], "part-0.parquet"))
    return out


# ---------------------------------------------------------------------------------------------- the phases


def phase_ray(args) -> dict:
    import pyarrow.parquet as pq

    from trainer.train import train

    config = train_config(args)
    labeled = pq.read_table(args.labeled_table)
    t0 = time.perf_counter()
    with _common.ray_cluster(num_cpus=args.cpus):
        cluster_seconds = time.perf_counter() - t0
        out = tempfile.mkdtemp(prefix="ray-", dir=args.scratch)
        manifest = pq.read_table(args.manifest)
        t1 = time.perf_counter()
        with _common.TreeCPU() as cpu:
            result = train(
                config,
                labeled=labeled,
                class_names=[f"c{i}" for i in range(CLASSES)],
                eval_set=labeled.slice(0, 64),
                model_uri=os.path.join(out, "model"),
                storage_path=os.path.join(out, "checkpoints"),
                run_name="bench",
                pseudo_manifest_uri=args.manifest,
                pseudo_rows=manifest.num_rows,
            )
        wall = time.perf_counter() - t1
    m = result.metrics
    images = args.steps * (config.batch_size + config.unlabeled_batch_size)
    steady = m["train_steady_images_per_second"]
    return {
        "steady": steady,
        "images": images,
        "total_seconds": wall,
        "cluster_start_seconds": cluster_seconds,
        "loop_seconds": m["train_loop_seconds"],
        "fixed_seconds": wall - images / steady,
        **cpu.report(args.cpus),
    }


def phase_plain(args) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3
    from torch.utils.data import DataLoader, Dataset

    from curation import imaging, storage
    from trainer import models
    from trainer import noise as noise_lib
    from trainer.loop import STEADY_AFTER_STEPS
    from trainer.models import ModelMeta

    cpu = _common.TreeCPU().start()
    t0 = time.perf_counter()
    config = train_config(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = ModelMeta(
        architecture=config.architecture,
        class_names=[f"c{i}" for i in range(CLASSES)],
        input_size=config.input_size,
        mean=config.mean,
        std=config.std,
    )

    class Noised(Dataset):
        """Decode, resize, RandAugment; the target as the trainer builds it."""

        def __init__(self, table):
            self.uris = table.column("uri").to_pylist()
            self.labels = table.column("label").to_numpy()
            self.topk = None
            if "topk_classes" in table.column_names:
                self.topk = (
                    np.stack(table.column("topk_classes").to_numpy(zero_copy_only=False)),
                    np.stack(table.column("topk_probs").to_numpy(zero_copy_only=False)),
                )
            self.noise = noise_lib.ImageNoise(config.noise, config.mean)

        def __len__(self):
            return len(self.uris)

        def __getitem__(self, i):
            img = self.noise.resize(imaging.decode_rgb(storage.read_bytes(self.uris[i])), config.input_size, 1.0)
            pixels = torch.from_numpy(imaging.to_array(self.noise(img)).copy())
            if self.topk is not None:
                target = noise_lib.soft_targets(
                    self.topk[0][i : i + 1], self.topk[1][i : i + 1], CLASSES, config.temperature
                )[0]
            else:
                target = noise_lib.hard_targets(self.labels[i : i + 1], CLASSES, config.label_smoothing)[0]
            return pixels, torch.from_numpy(target)

    def forever(loader):
        while True:
            yield from loader

    labeled = DataLoader(
        Noised(pq.read_table(args.labeled_table)),
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.loader_workers,
        persistent_workers=True,
    )
    pseudo = DataLoader(
        Noised(pq.read_table(args.manifest)),
        batch_size=config.unlabeled_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.loader_workers,
        persistent_workers=True,
    )

    model = models.create(meta, drop_rate=config.noise.dropout, drop_path_rate=config.noise.drop_path)
    model = model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True)
    optimizer = create_optimizer_v2(model, "adamw", lr=config.lr, weight_decay=config.weight_decay)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=config.steps,
        warmup_t=config.warmup_steps,
        warmup_lr_init=config.lr / 100,
        lr_min=config.lr / 100,
        t_in_epochs=False,
    )
    loss_fn = SoftTargetCrossEntropy()
    model.train()
    step, seen, steady_from, steady_seen = 0, 0, None, 0
    for (lp, lt), (pp, pt) in zip(forever(labeled), forever(pseudo)):
        pixels, target = torch.cat([lp, pp]), torch.cat([lt, pt])
        loss = loss_fn(model(models.normalize(pixels, meta)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        scheduler.step_update(step)
        ema.update(model, step=step)
        seen += len(pixels)
        loss.item()
        now = time.perf_counter()
        if step == STEADY_AFTER_STEPS:
            steady_from, steady_seen = now, seen
        if step == config.steps:
            break
    steady = (seen - steady_seen) / (now - steady_from)
    cpu.stop()
    return {
        "steady": steady,
        "images": seen,
        "total_seconds": now - t0,
        "fixed_seconds": now - t0 - seen / steady,
        **cpu.report(args.cpus),
    }


PHASES = {"ray": phase_ray, "plain": phase_plain}


# ------------------------------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--source-size", type=int, default=256, help="side of the JPEG files, pixels")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16, help="labeled images per step (3x as many pseudo-labeled)")
    p.add_argument("--labeled", type=int, default=256, help="labeled images")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads, both ways")
    p.add_argument("--loader-workers", type=int, default=1, help="plain: worker processes per DataLoader (two loaders)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="ray: CPUs reserved by the training worker")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ways", default="plain,ray")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--labeled-table", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        _common.phase_result(PHASES[args.phase](args))
        return

    machine = _common.machine()
    per_step = args.batch_size * 4
    pseudo = args.steps * args.batch_size * 3 + 4 * per_step  # one pass, with room to spare
    paths = _common.jpeg_pool(f"jpeg-{args.source_size}", args.labeled + pseudo, args.source_size, args.source_size)
    scratch = tempfile.mkdtemp(prefix="train-bench-", dir=_common.DATA_DIR)
    inputs = write_inputs(paths, scratch, args.labeled, pseudo)
    common = [
        "--manifest",
        inputs["manifest"],
        "--scratch",
        scratch,
        "--arch",
        args.arch,
        "--input-size",
        str(args.input_size),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--loader-workers",
        str(args.loader_workers),
        "--cpus",
        str(args.cpus),
        "--cpus-per-worker",
        str(args.cpus_per_worker),
        "--labeled-table",
        inputs["labeled"],
    ]
    ways = args.ways.split(",")
    runs, _ = _common.interleaved(SCRIPT, ways, common, args.repeats, show=("steady", "fixed_seconds"))
    figures = ("steady", "total_seconds", "fixed_seconds", "cpu_seconds")
    summary = {w: {k: _common.median([x[k] for x in runs[w]], 2) for k in figures} for w in ways}
    ratio = _common.ratio(runs, "ray", "plain", "steady") if {"ray", "plain"} <= set(ways) else None
    _common.emit(
        {
            "benchmark": "training_throughput",
            "machine": machine,
            "config": {
                "model": args.arch,
                "input_size": args.input_size,
                "classes": CLASSES,
                "source": f"{args.source_size}px JPEG",
                "steps": args.steps,
                "labeled_per_step": args.batch_size,
                "pseudo_per_step": args.batch_size * 3,
                "labeled_images": args.labeled,
                "pseudo_images": pseudo,
                "torch_threads": args.threads,
                "plain_loader_workers_per_loader": args.loader_workers,
                "ray_cpus": args.cpus,
                "cpus_per_worker": args.cpus_per_worker,
                "repeats": args.repeats,
            },
            "images_per_second_median": summary,
            "ray_vs_plain_steady": ratio,
            "bar": {"ray/plain >= 0.85 (steady)": ratio is not None and (ratio["median"] or 0.0) >= 0.85},
            "runs": runs,
        }
    )


if __name__ == "__main__":
    main()
