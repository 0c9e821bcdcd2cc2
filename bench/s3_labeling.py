"""Labeling throughput from S3: the same JPEGs labeled from local files, from S3 objects with and without
added latency, and from WebDataset shards and Parquet files of image bytes on S3.

    .venv/bin/python bench/s3_labeling.py          # about 30 minutes with the defaults

The same 4,096 photo-like JPEGs (64x64, quality 90, ``_common.photo_jpeg``) and the same untrained teacher
(timm ``resnet18``, 1,000 classes, at the JPEGs' own 64x64 input), labeled by
``workers.labeling.label`` on a private 2-CPU Ray cluster per run, batch 128, one predictions file per batch.
The ways:

- ``local``: a manifest of the JPEG files on local disk;
- ``s3_0ms``: a manifest of the same JPEGs as S3 objects, through the fault proxy (``bench/s3proxy.py``) with
  no added latency;
- ``s3_20ms``: the same objects through a proxy adding 20 ms (+-2 ms, seeded) to every request, a same-region
  S3 GET's time to first byte;
- ``s3_20ms_serial``: as ``s3_20ms`` with ``read_concurrency=1`` (objects read one at a time, as before reads
  were concurrent), on the first ``--serial-images`` images only, as it is slow;
- ``wds_s3_20ms``: WebDataset tar shards of 256 images on S3, at 20 ms;
- ``parquet_s3_20ms``: Parquet files of image bytes (an ``image`` column, row groups of 256) on S3, at 20 ms.

S3 is moto's server, in this process with the proxies (threads); each way runs in a child process of its own
(``_common.run_phase``) whose environment points at one proxy before its Ray cluster starts. Outputs go to
local disk in every way, so only the source differs, and each ledger entry's modification time dates one
output batch: the steady rate is that of ``labeling_throughput.steady_rate`` (the slope of images done against
time, after the first quarter of the images and before the last batch); end to end is images over the call.

The ways run interleaved: the first repeat in the order above, the second in reverse, and so on. Each repeat
gives the ratio of a way's steady rate to a reference run in the same repeat (``RATIOS``); reported are every
repeat's ratios and their median. moto spends about 4 ms of CPU per request, and reading an S3 object through
pyarrow is two requests (HEAD, GET), so the S3 server takes CPU that local files leave to labeling on this
2-core machine: compare S3 ways with each other. Prints JSON.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import labeling_throughput  # noqa: E402
from s3proxy import FaultProxy, Faults  # noqa: E402

from service import cluster  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
BUCKET = "nstudent-bench"
# Added latency of the slow proxy, and its jitter (uniform +-), seconds.
LATENCY_SECONDS = 0.020
JITTER_SECONDS = 0.002
# Images per WebDataset shard and per Parquet row group.
CONTAINER_IMAGES = 256
# Dummy credentials: the only S3 here is moto's, on loopback.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}

# way -> (source, proxy, read concurrency or None for the default)
WAYS = ("local", "s3_0ms", "s3_20ms", "s3_20ms_serial", "wds_s3_20ms", "parquet_s3_20ms")
# ratio name -> (numerator way, denominator way), both from the same repeat.
RATIOS = {
    "s3_20ms / s3_0ms": ("s3_20ms", "s3_0ms"),
    "s3_0ms / local": ("s3_0ms", "local"),
    "s3_20ms_serial / s3_0ms": ("s3_20ms_serial", "s3_0ms"),
    "wds_s3_20ms / s3_20ms": ("wds_s3_20ms", "s3_20ms"),
    "wds_s3_20ms / local": ("wds_s3_20ms", "local"),
    "parquet_s3_20ms / s3_20ms": ("parquet_s3_20ms", "s3_20ms"),
}
# The bars, on medians of per-repeat ratios: S3 objects at 20 ms reach at least 0.9 of S3 objects at 0 ms, and
# WebDataset shards on S3 at 20 ms at least 0.95 of local files.
BARS = {"s3_20ms / s3_0ms": 0.9, "wds_s3_20ms / local": 0.95}


# ---------------------------------------------------------------------------------------------- the phase


def phase_label(args) -> dict:
    """One labeling run in this child process, its S3 endpoint taken from the environment it was given."""
    from curation import storage
    from workers.labeling import LabelConfig, label

    t0 = time.perf_counter()
    with _common.ray_cluster(num_cpus=args.cpus):
        cluster_seconds = time.perf_counter() - t0
        out = tempfile.mkdtemp(prefix="s3-label-", dir=args.scratch)
        config = LabelConfig(
            batch_size=args.batch_size,
            torch_threads=args.threads,
            rows_per_file=args.rows_per_file,
            read_concurrency=args.read_concurrency or storage.DEFAULT_READ_CONCURRENCY,
        )
        t1 = time.perf_counter()
        result = label(args.source, args.teacher, out, config, teacher_id="bench", source_format=args.format)
        wall = time.perf_counter() - t1
    entries = labeling_throughput.commit_times(out)
    return {
        "images": result.images,
        "predicted": result.predicted,
        "rejected": result.rejected,
        "steady": labeling_throughput.steady_rate(entries),
        "end_to_end": result.images / wall,
        "cluster_start_seconds": cluster_seconds,
        "label_seconds": wall,
        "commits": len(entries),
        "read_concurrency": config.read_concurrency,
    }


# ------------------------------------------------------------------------------------------------- driver


def parquet_bytes(images: list[bytes]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array(images, pa.binary())}), buf, row_group_size=CONTAINER_IMAGES)
    return buf.getvalue()


def upload_sources(client, paths: list[str]) -> list[str]:
    """The JPEGs as objects (returns their URIs, in the order of ``paths``), as WebDataset shards under
    ``wds/`` and as Parquet files of bytes under ``parquet/``."""
    client.create_bucket(Bucket=BUCKET)
    root = os.path.commonpath(paths)
    keys = ["pool/" + os.path.relpath(p, root) for p in paths]
    blobs = [Path(p).read_bytes() for p in paths]
    groups = [range(a, min(a + CONTAINER_IMAGES, len(paths))) for a in range(0, len(paths), CONTAINER_IMAGES)]
    puts = list(zip(keys, blobs))
    puts += [
        (f"wds/pool-{g:06d}.tar", _common.tar_bytes([(f"{i:07d}.jpg", blobs[i]) for i in group]))
        for g, group in enumerate(groups)
    ]
    # four row groups per Parquet file
    files = [range(a, min(a + 4 * CONTAINER_IMAGES, len(paths))) for a in range(0, len(paths), 4 * CONTAINER_IMAGES)]
    puts += [(f"parquet/part-{f:04d}.parquet", parquet_bytes([blobs[i] for i in rows])) for f, rows in enumerate(files)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), puts))
    return [f"s3://{BUCKET}/{k}" for k in keys]


def main() -> None:
    p = _common.labeling_arguments(
        __doc__, source_size=64, arch="resnet18", input_size=64, batch_size=128, rows_per_file=128
    )
    p.add_argument("--serial-images", type=int, default=512, help="images of the s3_20ms_serial way")
    p.add_argument("--ways", default=",".join(WAYS))
    p.add_argument("--phase", choices=["label"], help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--format", help=argparse.SUPPRESS)
    p.add_argument("--read-concurrency", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.phase:
        _common.phase_result(phase_label(args))
        return

    import boto3
    from moto.server import ThreadedMotoServer

    machine = _common.machine()
    paths = _common.jpeg_pool(f"jpeg-{args.source_size}", args.images, args.source_size, args.source_size)
    teacher = labeling_throughput.teacher_folder(args.arch, args.input_size, args.classes)
    scratch = tempfile.mkdtemp(prefix="s3-label-bench-", dir=_common.DATA_DIR)

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto_port = cluster.free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    upstream = f"http://127.0.0.1:{moto_port}"
    fast = FaultProxy(upstream).start()
    slow = FaultProxy(upstream, Faults(latency_seconds=LATENCY_SECONDS, jitter_seconds=JITTER_SECONDS), seed=0).start()
    try:
        client = boto3.client(
            "s3",
            endpoint_url=upstream,
            region_name=AWS_ENV["AWS_REGION"],
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        objects = upload_sources(client, paths)
        local_manifest = _common.manifest(paths, os.path.join(scratch, "local.parquet"))
        s3_manifest = _common.manifest(objects, os.path.join(scratch, "s3.parquet"))
        serial_manifest = _common.manifest(objects[: args.serial_images], os.path.join(scratch, "s3-serial.parquet"))
        # way -> (source, format, proxy, read concurrency: 0 for the default)
        plan = {
            "local": (local_manifest, "manifest", None, 0),
            "s3_0ms": (s3_manifest, "manifest", fast, 0),
            "s3_20ms": (s3_manifest, "manifest", slow, 0),
            "s3_20ms_serial": (serial_manifest, "manifest", slow, 1),
            "wds_s3_20ms": (f"s3://{BUCKET}/wds", "webdataset", slow, 0),
            "parquet_s3_20ms": (f"s3://{BUCKET}/parquet", "parquet-bytes", slow, 0),
        }
        ways = [w for w in args.ways.split(",") if w]
        runs: dict[str, list[dict]] = {w: [] for w in ways}
        for r in range(args.repeats):
            for way in ways if r % 2 == 0 else ways[::-1]:
                source, fmt, proxy, concurrency = plan[way]
                # The child takes its S3 endpoint from its environment, before its Ray cluster starts.
                os.environ.update(AWS_ENV)
                os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint if proxy else upstream
                requests_before = proxy.counts["requests"] if proxy else 0
                load = _common.load()
                result = _common.run_phase(
                    SCRIPT,
                    [
                        "--phase",
                        "label",
                        "--source",
                        source,
                        "--format",
                        fmt,
                        "--teacher",
                        teacher,
                        "--scratch",
                        scratch,
                        "--batch-size",
                        str(args.batch_size),
                        "--threads",
                        str(args.threads),
                        "--cpus",
                        str(args.cpus),
                        "--rows-per-file",
                        str(args.rows_per_file),
                        "--read-concurrency",
                        str(concurrency),
                    ],
                )
                result.update(
                    repeat=r + 1,
                    load_average_1m_before=load,
                    s3_requests=(proxy.counts["requests"] - requests_before) if proxy else 0,
                )
                runs[way].append(result)
                print(
                    f"repeat {r + 1} {way}: steady {result['steady'] or 0:.1f} img/s, end-to-end "
                    f"{result['end_to_end']:.1f} img/s, {result['s3_requests']} S3 requests (load {load})",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        fast.stop()
        slow.stop()
        moto.stop()

    per_repeat: dict[str, list[float]] = {}
    for name, (num, den) in RATIOS.items():
        if num in runs and den in runs:
            per_repeat[name] = [
                round(a["steady"] / b["steady"], 3) for a, b in zip(runs[num], runs[den]) if a["steady"] and b["steady"]
            ]
    medians = {name: _common.median(v, 3) for name, v in per_repeat.items() if v}
    _common.emit(
        {
            "benchmark": "s3_labeling",
            "machine": machine,
            "config": {
                **_common.labeling_config(args),
                "serial_images": args.serial_images,
                "latency_seconds": LATENCY_SECONDS,
                "jitter_seconds": JITTER_SECONDS,
                "container_images": CONTAINER_IMAGES,
                "ways": ways,
            },
            "steady_images_per_second_median": {
                w: _common.median([x["steady"] for x in runs[w] if x["steady"]], 2)
                for w in ways
                if any(x["steady"] for x in runs[w])
            },
            "end_to_end_images_per_second_median": {
                w: _common.median([x["end_to_end"] for x in runs[w]], 2) for w in ways
            },
            "ratios_per_repeat": per_repeat,
            "ratios_median": medians,
            "bar": {f"{name} >= {bar}": medians[name] >= bar for name, bar in BARS.items() if name in medians},
            "runs": runs,
        }
    )


if __name__ == "__main__":
    main()
