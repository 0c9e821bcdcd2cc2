"""The labeling job's config: how the teacher labels the unlabeled pool (no Ray or torch here: the control
plane validates it in requests)."""

from __future__ import annotations

from pydantic import Field

from curation import imaging, storage
from curation.config import Config


class LabelConfig(Config):
    """How the teacher labels the unlabeled pool."""

    top_k: int = Field(
        5,
        ge=0,
        le=100_000,
        description="soft-label classes kept per image (the student renormalises them); 0: all of them, the "
        "teacher's full distribution (for few classes)",
    )
    batch_size: int = Field(256, ge=1, le=65_536, description="images per teacher forward pass")
    actors: int | None = Field(
        None, ge=1, le=4096, description="teacher actors; default: one per GPU, or 1 on a CPU-only cluster"
    )
    gpus_per_actor: float = Field(
        1.0, gt=0, le=64, description="GPUs reserved by each actor where the cluster has GPUs"
    )
    cpus_per_actor: float = Field(
        0.5, gt=0, le=1024, description="CPUs reserved by each CPU-only actor: a fraction, so decode tasks keep running"
    )
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="intra-op threads of a CPU actor; default: all cores"
    )
    shard_rows: int = Field(
        1024,
        ge=1,
        le=1_048_576,
        description="source rows per read task and per unit of resume (a killed job redoes at most "
        "the shards in flight)",
    )
    decode_batch_size: int = Field(
        128,
        ge=1,
        le=65_536,
        description="rows per decode task batch: small enough that a block of decoded 224px images stays ~20 MB",
    )
    rows_per_file: int = Field(
        16384, ge=1, le=16_777_216, description="rows per predictions file (at least; the last may be fewer)"
    )
    read_concurrency: int = Field(
        storage.DEFAULT_READ_CONCURRENCY,
        ge=1,
        le=256,
        description="objects each decode task reads at once "
        "(threads), to hide the store's per-request latency (about 20 ms a GET on S3); 1: one at a time",
    )
    stall_timeout_s: float | None = Field(
        600.0,
        gt=0,
        le=86_400,
        description="seconds without progress (no block moved between the job's stages) after "
        "which the job fails with a StallError naming what waits on what; none: wait forever",
    )
    gpu_decode: bool = Field(
        False,
        description="where the teacher actors have GPUs, decode baseline JPEGs on the GPU, in batches "
        "(imaging.device_decodable); every other image is decoded on the CPU as without it. Off by default: "
        "with 256 px sources and 16 vCPUs per GPU, decoding on the CPUs fed an H200 1.3-1.7x faster "
        "(docs/benchmarks.md, GPU labeling)",
    )
    decode: imaging.DecodeConfig = Field(
        default_factory=imaging.DecodeConfig,
        description="limits on one image (pixels, aspect ratio) and the background that transparency is flattened on",
    )
