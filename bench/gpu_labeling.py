"""GPU labeling: images/s of the labeling pipeline with CPU and with GPU JPEG decoding, against the model alone.

    .venv/bin/python bench/gpu_labeling.py [--images 4096] [--arch resnet50] [--input-size 224]

Three ways to label the same photo-like JPEG files (local disk) with the same untrained timm model:

- ``model``: the forward pass alone (normalisation, forward, softmax top-k) on a batch decoded beforehand and
  already on the device; on a GPU in bf16 autocast with channels_last, as the teacher actor runs it: the
  ceiling no pipeline can beat on this machine.
- ``cpu_decode``: ``workers.labeling.label`` on a private local Ray cluster with ``gpu_decode=False``: every
  image decoded and resized in CPU tasks.
- ``gpu_decode``: the same with ``gpu_decode=True``: baseline JPEGs passed through as bytes and decoded in
  batches on the teacher's GPU (``torchvision.io.decode_jpeg``), the rest on the CPU.
- ``cpu_decode_only``: the pipeline's reading and decoding alone (``read_and_decode`` in Ray Data tasks on the
  same cluster, no model, no writes): how fast the CPUs could feed the teacher.
- ``gpu_decode_only``: ``decode_on_device`` alone on the GPU (decoding, resizing and cropping batches of bytes
  read beforehand): how fast the teacher's GPU could decode for itself.

On a machine without a CUDA device the GPU part is skipped, with a message saying so, and ``model``,
``cpu_decode`` and ``cpu_decode_only`` are measured on the CPU (fp32), so the script always runs to completion.

The ways are interleaved within each repeat (A B C, then C B A, ...) so that a machine whose speed drifts
affects each about equally; each way runs in its own process. Reported: per repeat, each pipeline's steady
rate over the model's (``ratios``), and the median of those per-repeat ratios, beside the median rates.
``steady`` is images/s in steady state (``labeling_throughput.steady_rate``: outputs after the first quarter,
dated by the ledger's commits for the pipeline); ``end_to_end`` is images over the whole ``label`` call.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from labeling_throughput import phase_inputs, phase_pipeline, steady_rate  # noqa: E402

SCRIPT = str(Path(__file__).resolve())


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- the phases


def phase_model(args) -> dict:
    import numpy as np
    import torch

    from curation import imaging
    from trainer import models

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(args.threads)
    model, meta = models.load(args.teacher)
    model = model.to(device, memory_format=torch.channels_last).eval()
    paths = json.loads(Path(args.paths).read_text())[: args.batch_size]
    pixels = torch.from_numpy(
        np.stack([imaging.decode_for_model(Path(p).read_bytes(), meta.input_size, meta.crop_pct) for p in paths])
    ).to(device)
    batches = -(-args.images // args.batch_size)
    outputs = []

    def step() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(models.normalize(pixels, meta))
        torch.softmax(logits.float(), dim=1).topk(5, dim=1)[1].cpu()  # the copy back waits for the device

    step()  # the first batch pays for cuDNN's algorithm search and the allocator's growth: not the model's rate
    started = time.perf_counter()
    for _ in range(batches):
        step()
        outputs.append((time.perf_counter(), args.batch_size))
    images = batches * args.batch_size
    return {
        "images": images,
        "steady": steady_rate(outputs),
        "end_to_end": images / (outputs[-1][0] - started),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "bf16": cuda,
    }


def _phase_pipeline(args, gpu_decode: bool) -> dict:
    result = phase_pipeline(args, gpu_decode=gpu_decode, gpus_per_actor=args.gpus_per_actor)
    return {**result, "decoded_on": "gpu" if gpu_decode and result["cluster_gpus"] else "cpu"}


def phase_cpu_decode_only(args) -> dict:
    import ray

    from curation import tables
    from workers.config import LabelConfig
    from workers.labeling import DECODE_CPUS, READ_CPUS, read_and_decode

    size, crop_pct = _teacher_geometry(args.teacher)
    rows = LabelConfig().decode_batch_size
    with _common.ray_cluster(num_cpus=args.cpus):
        # Cut into blocks of a decode batch, as the pipeline does, so that decoding runs on every CPU.
        ds = tables.repartition(ray.data.read_parquet(args.manifest), rows, num_cpus=READ_CPUS).map_batches(
            read_and_decode,
            batch_size=rows,
            batch_format="numpy",
            fn_kwargs={"size": size, "crop_pct": crop_pct},
            num_cpus=DECODE_CPUS,
        )
        outputs = []
        started = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            outputs.append((time.perf_counter(), len(batch["image_id"])))
    return _rates(outputs, started)


def phase_gpu_decode_only(args) -> dict:
    import torch

    from workers.labeling import decode_on_device

    size, crop_pct = _teacher_geometry(args.teacher)
    device = torch.device("cuda")
    paths = json.loads(Path(args.paths).read_text())[: args.images]
    datas = [Path(p).read_bytes() for p in paths]
    batches = [datas[i : i + args.batch_size] for i in range(0, len(datas), args.batch_size)]
    decode_on_device(batches[0], size, crop_pct, device)  # the decoder's and the allocator's first use
    torch.cuda.synchronize()
    outputs = []
    started = time.perf_counter()
    for batch in batches:
        pixels, _ = decode_on_device(batch, size, crop_pct, device)
        torch.cuda.synchronize()
        outputs.append((time.perf_counter(), pixels.shape[0]))
    return _rates(outputs, started)


def _rates(outputs: list[tuple[float, int]], started: float) -> dict:
    """Images, and images/s in steady state and from ``started``, of the (time, images) of each output."""
    images = sum(n for _, n in outputs)
    return {"images": images, "steady": steady_rate(outputs), "end_to_end": images / (outputs[-1][0] - started)}


def _teacher_geometry(teacher: str) -> tuple[int, float]:
    from trainer.meta import load_meta

    meta = load_meta(teacher)
    return meta.input_size, meta.crop_pct


def phase_cpu_decode(args) -> dict:
    return _phase_pipeline(args, gpu_decode=False)


def phase_gpu_decode(args) -> dict:
    return _phase_pipeline(args, gpu_decode=True)


PHASES = {
    "model": phase_model,
    "cpu_decode": phase_cpu_decode,
    "gpu_decode": phase_gpu_decode,
    "cpu_decode_only": phase_cpu_decode_only,
    "gpu_decode_only": phase_gpu_decode_only,
}


# ------------------------------------------------------------------------------------------------- driver


def main() -> None:
    p = _common.labeling_arguments(
        __doc__, source_size=256, arch="resnet50", input_size=224, batch_size=256, rows_per_file=256
    )
    p.add_argument(
        "--gpus-per-actor", type=float, default=1.0, help="pipeline: GPU share of a teacher actor (0.5: two a GPU)"
    )
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.phase:
        _common.phase_result(PHASES[args.phase](args))
        return

    cuda = has_cuda()
    ways = ["model", "cpu_decode", "cpu_decode_only"] + (["gpu_decode", "gpu_decode_only"] if cuda else [])
    if not cuda:
        print(
            "no CUDA device: the GPU part (bf16 model-only on the GPU, GPU decoding) is skipped; measuring the "
            "CPU path (fp32 model-only on the CPU, CPU decoding)",
            file=sys.stderr,
            flush=True,
        )
    machine = _common.machine()
    if cuda:
        import torch

        machine["gpu"] = torch.cuda.get_device_name()
    common = [*phase_inputs(args, "gpu-label-bench-"), "--gpus-per-actor", str(args.gpus_per_actor)]
    runs, loads = _common.interleaved(SCRIPT, ways, common, args.repeats)

    summary = {w: {k: _common.median([x[k] for x in runs[w]], 2) for k in ("steady", "end_to_end")} for w in ways}
    ratios = {}
    for way in ways[1:]:
        ratios[f"{way}_vs_model"] = _common.ratio(runs, way, "model", "steady")
    _common.emit(
        {
            "benchmark": "gpu_labeling",
            "machine": machine,
            "gpu_part": "measured" if cuda else "skipped: no CUDA device",
            "note": "ratios are each way's steady rate over the model's: what share of the GPU's rate it could feed",
            "config": {
                **_common.labeling_config(args),
                "gpus_per_actor": args.gpus_per_actor,
                "ways": ways,
            },
            "images_per_second_median": summary,
            "steady_ratios": ratios,
            "load_average_before_each_run": loads,
            "runs": runs,
        }
    )


if __name__ == "__main__":
    main()
