"""Labeling: Ray Data streams an unlabeled source through teacher actors and writes soft labels.

shards of the manifest (image_id, uri) -> [tasks] read one shard, read bytes + decode + resize
-> [actors] teacher forward pass -> [write tasks] predictions/*.parquet, rejects/*.parquet, ledger/*.json

Decoding happens per image in CPU tasks, upstream of the actors: a file that cannot be read or decoded
becomes a reject row with its reason and never fails a block. The teacher runs un-noised (eval mode, the
EMA weights it was saved with). Actors take GPUs where the cluster has them; on a CPU-only cluster they
take a fraction of a CPU each, so the read and decode tasks always have CPUs left.

A folder source is listed once into ``<out>/source.parquet``. A job that is killed and run again labels only
what is missing, with no row twice: see ``workers.ledger``.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from pydantic import BaseModel, Field

from curation import imaging, schema, sources
from service import storage
from workers import ledger

# torch and timm (trainer.models) are imported where a model is used, in the actors and the driver, never at
# module level: every read, decode and write task imports this module, and importing them takes a new worker
# process 5 s of CPU and 1 GB of memory on a small node (docs/benchmarks.md).
if TYPE_CHECKING:
    from trainer.models import ModelMeta

log = logging.getLogger(__name__)

# Rows per read/decode task batch: small enough that a block of decoded 224px images stays ~20 MB.
DECODE_BATCH_SIZE = int(os.environ.get("NSTUDENT_DECODE_BATCH_SIZE", "128"))
# Manifest rows per read task (whole shards, inside one row group): a few MB of URIs. Their rows are cut into
# blocks of DECODE_BATCH_SIZE on the way out, so decoding runs in as many tasks as there are CPUs for it.
READ_UNIT_ROWS = 65_536
# CPUs reserved by a read task: it reads URIs only.
READ_CPUS = 0.25


class LabelConfig(BaseModel):
    """How the teacher labels the unlabeled pool."""

    top_k: int = Field(5, ge=1, description="soft-label classes kept per image")
    batch_size: int = Field(256, ge=1, description="images per teacher forward pass")
    actors: int | None = Field(None, ge=1, description="teacher actors; default: one per GPU, or 1 on a CPU-only cluster")
    gpus_per_actor: float = Field(1.0, gt=0, description="GPUs reserved by each actor where the cluster has GPUs")
    cpus_per_actor: float = Field(
        0.5, gt=0, description="CPUs reserved by each CPU-only actor: a fraction, so decode tasks keep running"
    )
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads of a CPU actor; default: all cores")
    shard_rows: int = Field(
        1024, ge=1, description="source rows per read task and per unit of resume (a killed job redoes at most "
        "the shards in flight)"
    )
    rows_per_file: int = Field(16384, ge=1, description="rows per predictions file (at least; the last may be fewer)")


class LabelResult(BaseModel):
    predictions_uri: str
    rejects_uri: str
    images: int = Field(description="rows read from the source")
    predicted: int
    rejected: dict[str, int] = Field(description="rejects by reason")
    resumed: int = Field(0, description="of the images, those labeled by an earlier run of the same job and kept")


def read_and_decode(batch: dict[str, np.ndarray], *, size: int, crop_pct: float) -> dict[str, np.ndarray]:
    """Bytes -> fixed-size uint8 pixels; ``reason`` is empty for a good image."""
    n = len(batch["uri"])
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    reasons, details = [""] * n, [""] * n
    for i, uri in enumerate(batch["uri"]):
        try:
            data = storage.read_bytes(str(uri))
        except (OSError, ValueError) as e:
            reasons[i], details[i] = imaging.MISSING, f"{type(e).__name__}: {e}"[:200]
            continue
        try:
            img = imaging.decode_rgb(data)
        except imaging.RejectedImage as e:
            reasons[i], details[i] = e.reason, e.detail
            continue
        pixels[i] = imaging.to_array(imaging.resize_square(img, size, crop_pct))
    out = {
        "image_id": batch["image_id"],
        "uri": batch["uri"],
        "pixels": pixels,
        "reason": np.array(reasons, dtype=object),
        "detail": np.array(details, dtype=object),
    }
    if "shard" in batch:
        out["shard"] = batch["shard"]
    return out


class TeacherPredictor:
    """A teacher model in an actor: pixels in, top-k soft labels out."""

    def __init__(self, model_uri: str, teacher_id: str, top_k: int, torch_threads: int | None):
        import torch

        from trainer import models

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(torch_threads or os.cpu_count() or 1)
        model, self.meta = models.load(model_uri)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.teacher_id = teacher_id
        self.top_k = min(top_k, self.meta.num_classes)
        # bf16 autocast on GPUs: same argmax, half the memory traffic; probabilities are computed in float32.
        self.autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        from trainer import models

        ok = batch["reason"] == ""
        n_ok = int(ok.sum())
        probs = np.zeros((n_ok, self.top_k), dtype=np.float32)
        classes = np.zeros((n_ok, self.top_k), dtype=np.int32)
        if n_ok:
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.device, non_blocking=True)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(models.normalize(pixels, self.meta))
            top = torch.softmax(logits.float(), dim=1).topk(self.top_k, dim=1)
            probs, classes = top.values.cpu().numpy(), top.indices.cpu().numpy().astype(np.int32)
        n, k = len(ok), self.top_k
        offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
        shard = {"shard": pa.array(batch["shard"], pa.int64())} if "shard" in batch else {}
        return pa.table(
            {
                "image_id": pa.array(batch["image_id"], pa.int64()),
                "uri": pa.array(batch["uri"], pa.string()),
                "label": pa.array(_scatter(classes[:, 0], ok, 0), pa.int32()),
                "confidence": pa.array(_scatter(probs[:, 0], ok, 0.0), pa.float32()),
                "topk_classes": pa.ListArray.from_arrays(offsets, pa.array(_scatter(classes, ok, 0).ravel())),
                "topk_probs": pa.ListArray.from_arrays(
                    offsets, pa.array(_scatter(probs, ok, 0.0).ravel().astype(np.float16), pa.float16())
                ),
                "teacher": pa.array([self.teacher_id] * n, pa.string()),
                "reason": pa.array(batch["reason"], pa.string()),
                "detail": pa.array(batch["detail"], pa.string()),
                **shard,
            }
        )


def _scatter(values: np.ndarray, ok: np.ndarray, fill: Any) -> np.ndarray:
    out = np.full((len(ok), *values.shape[1:]), fill, dtype=values.dtype)
    out[ok] = values
    return out


class LabelsDatasink(ray.data.Datasink):
    """Each write task writes one predictions file and one rejects file, commits them in the ledger with the
    rows it wrote per shard, and returns its counts."""

    def __init__(self, out_uri: str, *, rows_per_file: int | None = None):
        self.out_uri = out_uri
        self.rows_per_file = rows_per_file
        self.write_id = uuid.uuid4().hex[:12]
        self.counts: dict[str, int] = {}

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_file

    def write(self, blocks: Iterable[pa.Table], ctx) -> dict[str, int]:
        counts: Counter[str] = Counter()
        shards: Counter[int] = Counter()
        name = f"part-{self.write_id}-{ctx.task_idx:06d}"
        staged = {part: storage.join(self.out_uri, ledger.STAGING, part, f"{name}.parquet")
                  for part in (ledger.PREDICTIONS, ledger.REJECTS)}
        with _LazyWriter(staged[ledger.PREDICTIONS], schema.PREDICTIONS) as preds, \
                _LazyWriter(staged[ledger.REJECTS], schema.REJECTS) as rejects:
            for block in blocks:
                ids, rows = np.unique(block.column("shard").to_numpy(), return_counts=True)
                shards.update(dict(zip(ids.tolist(), rows.tolist())))
                ok = pc.equal(block.column("reason"), "")
                good = block.filter(ok)
                if good.num_rows:
                    preds.write(good.select(schema.PREDICTIONS.names).cast(schema.PREDICTIONS))
                    counts["predicted"] += good.num_rows
                bad = block.filter(pc.invert(ok))
                if bad.num_rows:
                    rejects.write(bad.select(schema.REJECTS.names).cast(schema.REJECTS))
                    counts.update(f"rejected:{r}" for r in bad.column("reason").to_pylist())
        if shards:
            ledger.commit(self.out_uri, name, dict(shards), dict(counts),
                          {ledger.PREDICTIONS: staged[ledger.PREDICTIONS] if preds.writer else None,
                           ledger.REJECTS: staged[ledger.REJECTS] if rejects.writer else None})
        return dict(counts)

    def on_write_complete(self, write_result) -> None:
        total: Counter[str] = Counter()
        for r in write_result.write_returns:
            total.update(r)
        self.counts = dict(total)


class _LazyWriter:
    """A Parquet writer that creates its file on the first write only (no empty files)."""

    def __init__(self, uri: str, schema_: pa.Schema):
        self.uri, self.schema, self.writer = uri, schema_, None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            fs, path = storage.resolve(self.uri)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            self.writer = pq.ParquetWriter(path, self.schema, filesystem=fs, compression="zstd")
        self.writer.write_table(table)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()


def has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def label(
    source_uri: str,
    model_uri: str,
    out_uri: str,
    config: LabelConfig | None = None,
    *,
    teacher_id: str = "",
    restart: bool = False,
) -> LabelResult:
    """Label every image of ``source_uri`` (a folder, or a Parquet manifest with ``uri`` and optional
    ``image_id`` columns) with the model at ``model_uri``; write ``<out>/predictions`` and ``<out>/rejects``.

    Run again into the same ``out_uri`` with the same source, model and top-k, a job labels only the rows that
    no earlier run committed (none when it had finished); counts are totals over the runs. Anything different,
    or ``restart``, clears the outputs first. A folder is listed once: files added to it later are labeled by
    a run with ``restart`` (or into a new ``out_uri``).
    """
    from trainer import models

    config = config or LabelConfig()
    meta = models.load_meta(model_uri)
    run = {
        "source": source_uri,
        "source_version": ledger.source_version(source_uri),
        "model": model_uri,
        "model_version": ledger.model_version(model_uri),
        "teacher_id": teacher_id,
        "top_k": config.top_k,
        "shard_rows": config.shard_rows,
    }
    ledger.open_run(out_uri, run, restart=restart)
    plan = ledger.ShardPlan.from_manifest(_source_manifest(source_uri, out_uri), config.shard_rows)
    state = ledger.load(out_uri, plan)
    sizes = plan.sizes()
    todo = state.done < sizes
    partial = np.nonzero(todo & (state.done > 0))[0]
    counts: Counter[str] = Counter(state.counts)
    if todo.any():
        log.info("labeling %d of %d shards (%d rows already labeled)", todo.sum(), plan.num_shards, state.rows)
        sink = LabelsDatasink(out_uri, rows_per_file=config.rows_per_file)
        _labeling_dataset(plan, todo, ledger.written_ids(out_uri, state, partial), model_uri, meta, config,
                          teacher_id).write_datasink(sink)
        counts.update(sink.counts)
    rejected = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("rejected:")}
    result = LabelResult(
        predictions_uri=storage.join(out_uri, ledger.PREDICTIONS),
        rejects_uri=storage.join(out_uri, ledger.REJECTS),
        images=counts.get("predicted", 0) + sum(rejected.values()),
        predicted=counts.get("predicted", 0),
        rejected=rejected,
        resumed=state.rows,
    )
    if result.images != plan.num_rows:  # only a manifest that lists one URI twice gets here
        log.warning("%s: %d rows labeled of a source of %d", out_uri, result.images, plan.num_rows)
    storage.write_json(storage.join(out_uri, ledger.RESULT), result.model_dump())
    return result


def _labeling_dataset(
    plan: ledger.ShardPlan,
    todo: np.ndarray,
    skip_ids: np.ndarray,
    model_uri: str,
    meta: ModelMeta,
    config: LabelConfig,
    teacher_id: str,
) -> ray.data.Dataset:
    # One read task per unit of the manifest, created lazily. The read tasks have their own CPU share, so they
    # are not fused with decoding; their output is cut into decode-batch blocks, one decode task each.
    units = plan.units(READ_UNIT_ROWS, todo)
    ds = ray.data.range(len(units), override_num_blocks=len(units)).map_batches(
        read_units, batch_format="numpy", batch_size=1, num_cpus=READ_CPUS,
        fn_kwargs={"plan": plan, "units": units, "todo": todo, "skip_ids": skip_ids},
    ).repartition(target_num_rows_per_block=DECODE_BATCH_SIZE)
    ds = ds.map_batches(
        read_and_decode,
        batch_size=DECODE_BATCH_SIZE,
        batch_format="numpy",
        fn_kwargs={"size": meta.input_size, "crop_pct": meta.crop_pct},
    )
    if has_gpus():
        actors = config.actors or int(ray.cluster_resources()["GPU"] // config.gpus_per_actor)
        resources: dict[str, Any] = {"num_gpus": config.gpus_per_actor}
    else:
        actors = config.actors or 1
        resources = {"num_cpus": config.cpus_per_actor}
    return ds.map_batches(
        TeacherPredictor,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "teacher_id": teacher_id,
            "top_k": config.top_k,
            "torch_threads": config.torch_threads,
        },
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
        **resources,
    )


def read_units(
    batch: dict[str, np.ndarray], *, plan: ledger.ShardPlan, units: np.ndarray, todo: np.ndarray, skip_ids: np.ndarray
) -> pa.Table:
    """The rows of read units ``units[batch["id"]]`` as (image_id, uri, shard): only rows of shards still to do
    (``todo``), less the ids in ``skip_ids`` (rows of partly finished shards that an earlier run committed)."""
    parts = []
    for i in batch["id"]:
        first, stop = (int(v) for v in units[int(i)])
        rows = sources.read_unlabeled(*plan.locate(first, stop))
        shard = first + np.arange(rows.num_rows, dtype=np.int64) // plan.shard_rows
        keep = todo[shard]
        if skip_ids.size:
            keep &= ~np.isin(rows.column("image_id").to_numpy(), skip_ids)
        parts.append(rows.append_column("shard", pa.array(shard)).filter(pa.array(keep)))
    if not parts:
        return sources.UNLABELED_SCHEMA.append(pa.field("shard", pa.int64())).empty_table()
    return pa.concat_tables(parts)


def _source_manifest(source_uri: str, out_uri: str) -> str:
    """The source as a manifest: itself, or a folder listed once into ``<out>/source.parquet`` (kept for a
    resumed run, which never lists again)."""
    if sources.is_manifest(source_uri):
        return source_uri
    manifest_uri = storage.join(out_uri, ledger.SOURCE_MANIFEST)
    if not storage.exists(manifest_uri):
        sources.index(source_uri, manifest_uri)
    return manifest_uri
