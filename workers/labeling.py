"""Labeling: Ray Data streams an unlabeled source through teacher actors and writes soft labels.

shards of the manifest (image_id, uri) -> [tasks] read one shard, read bytes + decode + resize
-> [actors] teacher forward pass -> [write tasks] predictions/*.parquet, rejects/*.parquet, ledger/*.json

Decoding happens per image in CPU tasks, upstream of the actors: a file that cannot be read (missing,
forbidden) or decoded becomes a reject row with its reason and never fails a block. A store that still fails
after its client's retries (``curation.storage``) fails the task instead: no image is rejected for that. The
teacher runs un-noised (eval mode, the EMA weights it was saved with). Actors take GPUs where the cluster has
them; on a CPU-only cluster they take a fraction of a CPU each, so the read and decode tasks always have CPUs
left.

A folder source is listed once into ``<out>/source.parquet``. A job that is killed and run again labels only
what is missing, with no row twice: see ``workers.ledger``.

WebDataset tar shards and Parquet files of image bytes (``curation.sources.SourceFormat``) are read a tar
shard or a row group per read task, each tar streamed once from start to end; their rows carry the image bytes
in a ``data`` column, which decoding uses instead of fetching by URI. A contained image's URI, in predictions
and rejects alike, is ``<container URI>#<member>``.

GPU decoding (``LabelConfig.gpu_decode``, on a cluster with GPUs): a decode task passes the bytes of each JPEG that
``imaging.device_decodable`` accepts through, in a ``data`` column with ``on_device`` true, and decodes the rest on
the CPU as before, their pixels in the same column as raw bytes: its blocks have no ``pixels`` column, so a batch
carries each image's compressed bytes or its pixels, never both, and no row ships zeros. The teacher actor decodes
the passed-through JPEGs on its device in one batch (``torchvision.io.decode_jpeg``), resizes and crops them as
``imaging.resize_square`` does (bilinear, antialiased), and falls back to ``imaging.decode_for_model`` on its CPU
for any image the device decoder fails on, so a damaged file is rejected with the same reason either way.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from pydantic import BaseModel, Field

from curation import access, imaging, schema, sources, storage, tables
from curation.layout import LABELING_PROGRESS, PROGRESS_SECONDS
from trainer.meta import load_meta
from workers import ledger, watchdog
from workers.config import LabelConfig

# torch and timm (trainer.models) are imported only where a model runs, in the teacher actors: every read,
# decode and write task and the job's driver import this module, and importing them takes a process 4 s of CPU
# and 1 GB of memory on a small node (docs/benchmarks.md). The driver reads model.json with trainer.meta.
if TYPE_CHECKING:
    from trainer.meta import ModelMeta

log = logging.getLogger(__name__)

# Manifest rows per read task (whole shards, inside one row group): a few MB of URIs. Their rows are cut into
# blocks of LabelConfig.decode_batch_size rows on the way out, so decoding runs in as many tasks as there
# are CPUs for it.
READ_UNIT_ROWS = 65_536
# <out>/progress/: one small JSON per teacher actor, its rows labeled so far (the driver's progress bars).
# CPUs reserved by a read task: it reads URIs only.
READ_CPUS = 0.25
# CPUs reserved by a decode task and by a write task. With a CPU actor's 0.5 every stage fits a one-CPU node:
# with a whole CPU per task (Ray's default), a teacher actor holding half a CPU left every decode and write task
# pending, forever. Tasks and actors still use every core they find: this is the scheduler's bookkeeping only.
DECODE_CPUS = 0.5
WRITE_CPUS = 0.25


class LabelResult(BaseModel):
    predictions_uri: str
    rejects_uri: str
    images: int = Field(description="rows read from the source")
    predicted: int
    rejected: dict[str, int] = Field(description="rejects by reason")
    resumed: int = Field(0, description="of the images, those labeled by an earlier run of the same job and kept")


def read_and_decode(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    crop_pct: float,
    decode: imaging.DecodeConfig | None = None,
    read_concurrency: int = storage.DEFAULT_READ_CONCURRENCY,
    roots: tuple[str, ...] | None = None,
    device_decode: bool = False,
) -> dict[str, np.ndarray]:
    """Bytes -> fixed-size uint8 pixels; ``reason`` is empty for a good image.

    With ``device_decode``, the output has ``data`` (bytes) and ``on_device`` (bool) columns instead of
    ``pixels``: a JPEG that ``imaging.device_decodable`` accepts is not decoded here but passed through for the
    teacher actor's device (``on_device`` true, its file's bytes in ``data``); every other good image's
    ``data`` is its ``size x size x 3`` uint8 pixels, row by row, and a rejected one's is empty.

    Bytes are fetched by URI ``read_concurrency`` objects at a time while earlier rows decode. An object that
    does not exist or may not be read is rejected as ``missing``; a store that still fails after its client's
    retries (``storage.StorageUnavailable``) fails the task instead, so no image is rejected for a fault of the
    store (Ray retries the task, or the job fails and its rerun resumes). Each URI is checked where it is read
    (``curation.access.ReadPolicy``: under ``roots``, a regular file, at most ``decode.max_file_bytes``) and
    rejected with the first reason that applies, never opened when it lies outside the roots."""
    decode = decode or imaging.DecodeConfig()
    policy = access.ReadPolicy(roots, decode.max_file_bytes)
    n = len(batch["uri"])
    pixels = None if device_decode else np.zeros((n, size, size, 3), dtype=np.uint8)
    reasons, details = [""] * n, [""] * n
    passed = np.full(n, b"", dtype=object)
    on_device = np.zeros(n, dtype=bool)
    carried = batch.get("data")  # WebDataset and parquet-bytes rows carry their bytes: never fetched by URI
    fetched: Iterable[bytes | Exception] = (
        (bytes(d or b"") for d in carried)
        if carried is not None
        else storage.iter_read([str(u) for u in batch["uri"]], read_concurrency, policy.read)
    )
    for i, data in enumerate(fetched):
        if not isinstance(data, Exception) and len(data) > policy.max_bytes:  # a member of a container
            data = access.Refused(imaging.TOO_LARGE, f"{len(data)} bytes, over the cap of {policy.max_bytes}")
        if isinstance(data, access.Refused):
            reasons[i], details[i] = data.reason, data.detail[:200]
            continue
        if isinstance(data, Exception):
            reason = imaging.TOO_LARGE if isinstance(data, MemoryError) else imaging.MISSING
            reasons[i], details[i] = reason, f"{type(data).__name__}: {data}"[:200]
            continue
        if device_decode and imaging.device_decodable(data, decode):
            passed[i], on_device[i] = data, True
            continue
        try:
            decoded = imaging.decode_for_model(data, size, crop_pct, decode)
        except imaging.RejectedImage as e:  # the only exception it raises, MemoryError included
            reasons[i], details[i] = e.reason, e.detail
            continue
        if pixels is None:  # device_decode: the pixels travel as bytes, with the passed-through JPEGs
            passed[i] = decoded.tobytes()
        else:
            pixels[i] = decoded
    out = {
        "image_id": batch["image_id"],
        "uri": batch["uri"],
        "reason": np.array(reasons, dtype=object),
        "detail": np.array(details, dtype=object),
    }
    if pixels is None:  # device_decode; every block of a run has the same columns
        out["data"], out["on_device"] = passed, on_device
    else:
        out["pixels"] = pixels
    if "shard" in batch:
        out["shard"] = batch["shard"]
    return out


def decode_on_device(
    datas: list[bytes],
    size: int,
    crop_pct: float,
    device: Any,
    decode: imaging.DecodeConfig | None = None,
) -> tuple[Any, list[tuple[str, str]]]:
    """JPEG bytes (``imaging.device_decodable``) -> (uint8 NHWC ``size x size x 3`` tensor on ``device``,
    per image ``(reason, detail)``: empty for a good image).

    The batch is decoded in one ``torchvision.io.decode_jpeg`` call; if that fails (one damaged file fails the
    whole call), each image is decoded alone on the device, and one that still fails is decoded with
    ``imaging.decode_for_model`` on the CPU, which gives the pixels or the reject reason the CPU path gives.
    Each image is resized as ``imaging.resize_square`` does: the shorter side to size/crop_pct (bilinear,
    antialiased as PIL's is when shrinking), then the centred crop."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        images: list[Any] = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        images = []
        for e in encoded:
            try:
                images.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
    out = torch.zeros((len(datas), size, size, 3), dtype=torch.uint8, device=device)
    verdicts = [("", "")] * len(datas)
    # Images of the same size are resized together: one interpolation for each size in the batch, not for each
    # image, which would leave the device waiting on the kernel launches of hundreds of small images.
    by_size: dict[tuple[int, int], list[int]] = {}
    for j, img in enumerate(images):
        if img is None:
            try:
                out[j] = torch.from_numpy(imaging.decode_for_model(datas[j], size, crop_pct, decode)).to(device)
            except imaging.RejectedImage as e:
                verdicts[j] = (e.reason, e.detail)
            continue
        by_size.setdefault(tuple(img.shape[-2:]), []).append(j)
    for (h, w), idx in by_size.items():
        scale = size / crop_pct / min(w, h)
        rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
        resized = F.interpolate(
            torch.stack([images[j] for j in idx]).float(),
            size=(rh, rw),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        left, top = (rw - size) // 2, (rh - size) // 2
        crop = resized[:, :, top : top + size, left : left + size]
        out[torch.tensor(idx, device=device)] = crop.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out, verdicts


class TeacherPredictor:
    """A teacher model in an actor: pixels in, top-k soft labels out."""

    def __init__(
        self,
        model_uri: str,
        teacher_id: str,
        top_k: int,
        torch_threads: int | None,
        progress_dir: str = "",
        decode: imaging.DecodeConfig | None = None,
        progress_seconds: float = PROGRESS_SECONDS,
    ):
        import torch

        from trainer import models

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(torch_threads or os.cpu_count() or 1)
        model, self.meta = models.load(model_uri)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.teacher_id = teacher_id
        self.decode = decode
        self.top_k = min(top_k, self.meta.num_classes) if top_k > 0 else self.meta.num_classes
        # bf16 autocast on GPUs: same argmax, half the memory traffic; probabilities are computed in float32.
        self.autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        # Rows this actor has labeled, in <out>/progress/<actor>.json every few seconds: the driver sums them
        # for the progress bars (written files alone move only once per rows_per_file rows).
        self.progress_uri = storage.join(progress_dir, f"{uuid.uuid4().hex}.json") if progress_dir else ""
        self.rows, self.progress_at, self.progress_seconds = 0, 0.0, progress_seconds

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        from trainer import models

        on_device = "on_device" in batch  # the decode tasks' device_decode output: no pixels column
        if on_device:
            decoded, batch = self._decode_on_device(batch)
        ok = batch["reason"] == ""
        n_ok = int(ok.sum())
        probs = np.zeros((n_ok, self.top_k), dtype=np.float32)
        classes = np.zeros((n_ok, self.top_k), dtype=np.int32)
        if n_ok:
            if on_device:
                pixels = decoded if n_ok == len(ok) else decoded[torch.from_numpy(ok).to(self.device)]
            else:
                host = batch["pixels"] if n_ok == len(ok) else batch["pixels"][ok]  # a copy only with rejects
                pixels = torch.from_numpy(np.ascontiguousarray(host)).to(self.device, non_blocking=True)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(models.normalize(pixels, self.meta))
            top = torch.softmax(logits.float(), dim=1).topk(self.top_k, dim=1)
            probs, classes = top.values.cpu().numpy(), top.indices.cpu().numpy().astype(np.int32)
        n, k = len(ok), self.top_k
        self._count(n)
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

    def _decode_on_device(self, batch: dict[str, np.ndarray]) -> tuple[Any, dict[str, np.ndarray]]:
        """The batch's pixels on the device, its passed-through rows decoded there; ``batch`` with the reasons
        of those that the CPU fallback rejected."""
        import torch

        size = self.meta.input_size
        pixels = torch.zeros((len(batch["on_device"]), size, size, 3), dtype=torch.uint8, device=self.device)
        # The rows decoded on the CPU carry their pixels as bytes (rejects carry none).
        on_cpu = np.nonzero(~batch["on_device"] & (batch["reason"] == ""))[0]
        if len(on_cpu):
            host = np.stack([np.frombuffer(batch["data"][r], np.uint8).reshape(size, size, 3) for r in on_cpu])
            pixels[torch.from_numpy(on_cpu).to(self.device)] = torch.from_numpy(host).to(self.device)
        rows = np.nonzero(batch["on_device"])[0]
        if not len(rows):
            return pixels, batch
        decoded, verdicts = decode_on_device(
            [bytes(batch["data"][r]) for r in rows], size, self.meta.crop_pct, self.device, self.decode
        )
        pixels[torch.from_numpy(rows).to(self.device)] = decoded
        if any(reason for reason, _ in verdicts):
            batch = {**batch, "reason": batch["reason"].copy(), "detail": batch["detail"].copy()}
            for r, (reason, detail) in zip(rows, verdicts, strict=True):
                if reason:
                    batch["reason"][r], batch["detail"][r] = reason, detail
        return pixels, batch

    def _count(self, rows: int) -> None:
        self.rows += rows
        if self.progress_uri and time.monotonic() - self.progress_at >= self.progress_seconds:
            self.progress_at = time.monotonic()
            try:
                storage.write_json(self.progress_uri, {"rows": self.rows})
            except OSError:  # progress is best effort
                pass


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
        """A store that still fails after its client's retries fails the task with ``StorageUnavailable``, which
        Ray Data runs again: the run writes the same files under the same names, and its commit replaces what
        an earlier run may have moved into place."""
        with storage.store_errors(self.out_uri):
            return self._write(blocks, ctx)

    def _write(self, blocks: Iterable[pa.Table], ctx) -> dict[str, int]:
        counts: Counter[str] = Counter()
        shards: Counter[int] = Counter()
        name = f"part-{self.write_id}-{ctx.task_idx:06d}"
        staged = {
            part: storage.join(self.out_uri, ledger.STAGING, part, f"{name}.parquet")
            for part in (ledger.PREDICTIONS, ledger.REJECTS)
        }
        with (
            _LazyWriter(staged[ledger.PREDICTIONS], schema.PREDICTIONS) as preds,
            _LazyWriter(staged[ledger.REJECTS], schema.REJECTS) as rejects,
        ):
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
            ledger.commit(
                self.out_uri,
                name,
                dict(shards),
                dict(counts),
                {
                    ledger.PREDICTIONS: staged[ledger.PREDICTIONS] if preds.writer else None,
                    ledger.REJECTS: staged[ledger.REJECTS] if rejects.writer else None,
                },
            )
        return dict(counts)

    def on_write_complete(self, write_result) -> None:
        total: Counter[str] = Counter()
        for r in write_result.write_returns:
            total.update(r)
        self.counts = dict(total)


class _LazyWriter:
    """A Parquet writer that creates its file on the first write only (no empty files)."""

    def __init__(self, uri: str, schema_: pa.Schema):
        self.uri, self.schema = uri, schema_
        self.writer: pq.ParquetWriter | None = None

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
    source_format: sources.SourceFormat | str | None = None,
    roots: list[str] | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
) -> LabelResult:
    """Label every image of ``source_uri`` (a folder, a Parquet manifest with ``uri`` and optional
    ``image_id`` columns, WebDataset tar shards or Parquet files of image bytes: ``source_format``, default
    inferred by ``sources.infer_format``) with the model at ``model_uri``; write ``<out>/predictions`` and
    ``<out>/rejects``.

    Run again into the same ``out_uri`` with the same source, model and top-k, a job labels only the rows that
    no earlier run committed (none when it had finished); counts are totals over the runs. Anything different,
    or ``restart``, clears the outputs first. A folder is listed once: files added to it later are labeled by
    a run with ``restart`` (or into a new ``out_uri``).

    With ``roots``, the source, the model and every image must lie under one of them: an image that does not is
    rejected as ``outside_roots`` and never opened (``curation.access``).
    """
    config = config or LabelConfig()
    policy = access.ReadPolicy(tuple(roots) if roots is not None else None, config.decode.max_file_bytes)
    policy.require("the source", source_uri)
    policy.require("the teacher", model_uri)
    meta = load_meta(model_uri)
    fmt = sources.resolve_format(source_uri, source_format)
    ledger.open_run(out_uri, _run_record(source_uri, fmt, model_uri, teacher_id, config), restart=restart)
    plan = _plan(source_uri, fmt, out_uri, config)
    state = ledger.load(out_uri, plan)
    todo = (state.sizes < 0) | (state.done < state.sizes)  # a tar shard of unknown size is not finished
    partial = np.nonzero(todo & (state.done > 0))[0]
    counts: Counter[str] = Counter(state.counts)
    if todo.any():
        log.info("labeling %d of %d shards (%d rows already labeled)", todo.sum(), plan.num_shards, state.rows)
        sink = LabelsDatasink(out_uri, rows_per_file=config.rows_per_file)
        _labeling_dataset(
            plan,
            todo,
            ledger.written_ids(out_uri, state, partial),
            model_uri,
            meta,
            config,
            teacher_id,
            fmt=fmt,
            out_uri=out_uri,
            roots=policy.roots,
            progress_seconds=progress_seconds,
        ).write_datasink(sink, ray_remote_args={"num_cpus": WRITE_CPUS})
        counts.update(sink.counts)
    result = _result(out_uri, counts, state.rows)
    if plan.num_rows is not None and result.images != plan.num_rows:  # a manifest listing one URI twice
        log.warning("%s: %d rows labeled of a source of %d", out_uri, result.images, plan.num_rows)
    storage.write_json(storage.join(out_uri, ledger.RESULT), result.model_dump())
    return result


def _run_record(
    source_uri: str, fmt: sources.SourceFormat, model_uri: str, teacher_id: str, config: LabelConfig
) -> dict[str, Any]:
    """What the outputs in a labels folder belong to: a run with any other record starts them again."""
    return {
        "source": source_uri,
        "format": fmt.value,
        "source_version": ledger.source_version(source_uri, fmt),
        "model": model_uri,
        "model_version": ledger.model_version(model_uri),
        "teacher_id": teacher_id,
        "top_k": config.top_k,
        "shard_rows": config.shard_rows,
        "decode": config.decode.model_dump(mode="json"),  # other limits give other rejects: not the same run
    }


def _plan(source_uri: str, fmt: sources.SourceFormat, out_uri: str, config: LabelConfig) -> ledger.Plan:
    """The source's shards, the units of the resume ledger: tar shards, Parquet row groups, or row ranges of
    a manifest (a folder listed into one first)."""
    if fmt is sources.SourceFormat.WEBDATASET:
        return ledger.TarPlan.listed(source_uri, out_uri)
    if fmt is sources.SourceFormat.PARQUET_BYTES:
        return ledger.ShardPlan.per_row_group(source_uri)
    return ledger.ShardPlan.from_manifest(_source_manifest(source_uri, out_uri, fmt), config.shard_rows)


def _result(out_uri: str, counts: Counter[str], resumed: int) -> LabelResult:
    """The totals over every run into ``out_uri``, from the ledger's counts and this run's."""
    rejected = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("rejected:")}
    return LabelResult(
        predictions_uri=storage.join(out_uri, ledger.PREDICTIONS),
        rejects_uri=storage.join(out_uri, ledger.REJECTS),
        images=counts.get("predicted", 0) + sum(rejected.values()),
        predicted=counts.get("predicted", 0),
        rejected=rejected,
        resumed=resumed,
    )


def _labeling_dataset(
    plan: ledger.ShardPlan,
    todo: np.ndarray,
    skip_ids: np.ndarray,
    model_uri: str,
    meta: ModelMeta,
    config: LabelConfig,
    teacher_id: str,
    *,
    fmt: sources.SourceFormat = sources.SourceFormat.MANIFEST,
    out_uri: str = "",
    roots: tuple[str, ...] | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
) -> ray.data.Dataset:
    # One read task per unit of the manifest, created lazily. The read tasks have their own CPU share, so they
    # are not fused with decoding; their output is cut into decode-batch blocks, one decode task each.
    # WebDataset and parquet-bytes units (a tar shard, a row group) are read with their image bytes.
    units = plan.units(READ_UNIT_ROWS, todo)
    reader: Callable[..., Any] = read_units
    kwargs: dict[str, Any] = {"plan": plan, "units": units, "todo": todo, "skip_ids": skip_ids}
    if fmt in (sources.SourceFormat.WEBDATASET, sources.SourceFormat.PARQUET_BYTES):
        reader, kwargs = read_container_units, {**kwargs, "out_uri": out_uri, "chunk_rows": config.decode_batch_size}
    # The unit numbers are blocks made here (from_items), not a range read: a read task would reserve a whole
    # CPU, which a one-CPU node running the teacher actor never has.
    # A store still failing after its client's retries fails a read or decode task, not its images; Ray Data
    # runs it again a few times (each run retries every request again, about 13 s on a store that is down)
    # before the job fails.
    ds: ray.data.Dataset = storage.retry_on_store(
        ray.data.from_items([{"id": i} for i in range(len(units))], override_num_blocks=max(1, len(units)))
    )
    ds = ds.map_batches(
        reader,
        batch_format="numpy",
        batch_size=1,
        num_cpus=READ_CPUS,
        fn_kwargs=kwargs,
    )
    ds = tables.repartition(ds, config.decode_batch_size, num_cpus=READ_CPUS)
    if has_gpus():
        actors = config.actors or int(ray.cluster_resources()["GPU"] // config.gpus_per_actor)
        resources: dict[str, Any] = {"num_gpus": config.gpus_per_actor}
    else:
        actors = config.actors or 1
        resources = {"num_cpus": config.cpus_per_actor}
    # Ray Data fuses a task stage into the actor stage after it when both ask for the same resources, which
    # would move all decoding into the teacher's process: a decode task then asks for a hair less.
    decode_cpus = DECODE_CPUS if resources.get("num_cpus") != DECODE_CPUS else DECODE_CPUS - 0.01
    ds = ds.map_batches(
        read_and_decode,
        batch_size=config.decode_batch_size,
        batch_format="numpy",
        fn_kwargs={
            "size": meta.input_size,
            "crop_pct": meta.crop_pct,
            "decode": config.decode,
            "read_concurrency": config.read_concurrency,
            "roots": roots,
            "device_decode": config.gpu_decode and "num_gpus" in resources,
        },
        num_cpus=decode_cpus,
    )
    labeled = ds.map_batches(
        TeacherPredictor,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "teacher_id": teacher_id,
            "top_k": config.top_k,
            "torch_threads": config.torch_threads,
            "progress_dir": storage.join(out_uri, LABELING_PROGRESS) if out_uri else "",
            "progress_seconds": progress_seconds,
            "decode": config.decode,
        },
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
        **resources,
    )
    return watchdog.watch(labeled, config.stall_timeout_s, job="labeling")


def read_units(
    batch: dict[str, np.ndarray], *, plan: ledger.ShardPlan, units: np.ndarray, todo: np.ndarray, skip_ids: np.ndarray
) -> pa.Table:
    """The rows of read units ``units[batch["id"]]`` as (image_id, uri, shard): only rows of shards still to do
    (``todo``), less the ids in ``skip_ids`` (rows of partly finished shards that an earlier run committed)."""
    parts = []
    for i in batch["id"]:
        first, stop = (int(v) for v in units[int(i)])
        where = plan.locate(first, stop)
        with storage.store_errors(where[0]):
            rows = sources.read_unlabeled(*where)
        shard = first + np.arange(rows.num_rows, dtype=np.int64) // plan.shard_rows
        keep = todo[shard]
        if skip_ids.size:
            keep &= ~np.isin(rows.column("image_id").to_numpy(), skip_ids)
        parts.append(rows.append_column("shard", pa.array(shard)).filter(pa.array(keep)))
    if not parts:
        return sources.UNLABELED_SCHEMA.append(pa.field("shard", pa.int64())).empty_table()
    return pa.concat_tables(parts)


def read_container_units(
    batch: dict[str, np.ndarray],
    *,
    plan: ledger.Plan,
    units: np.ndarray,
    todo: np.ndarray,
    skip_ids: np.ndarray,
    out_uri: str,
    chunk_rows: int,
) -> Iterator[pa.Table]:
    """The images of read units ``units[batch["id"]]`` of a WebDataset (a tar shard each) or parquet-bytes
    source (a row group each) as (image_id, uri, data, shard) tables of at most ``chunk_rows`` rows, less
    the ids in ``skip_ids``. A tar shard is streamed once, start to end; then its size is recorded in the
    ledger (``ledger.record_size``), so that a resumed run knows whether it is finished. A store that still
    fails after its client's retries fails the task with ``storage.StorageUnavailable``, which Ray Data runs
    again (``storage.retry_on_store``); a shard that does not exist or may not be read fails the job."""
    for i in batch["id"]:
        first, _ = (int(v) for v in units[int(i)])
        if isinstance(plan, ledger.TarPlan):
            uri = plan.files[first]
            images = 0
            with storage.store_errors(uri):
                for rows in sources.read_tar_images(uri, chunk_rows=chunk_rows):
                    images += rows.num_rows
                    yield from _unit_rows(rows, first, skip_ids)
            with storage.store_errors(out_uri):
                ledger.record_size(out_uri, first, images)
        else:
            uri, group, _, _ = plan.locate(first)
            with storage.store_errors(uri):
                for rows in sources.read_parquet_images(uri, group, chunk_rows=chunk_rows):
                    yield from _unit_rows(rows, first, skip_ids)


def _unit_rows(rows: pa.Table, shard: int, skip_ids: np.ndarray) -> Iterator[pa.Table]:
    if skip_ids.size:
        rows = rows.filter(pa.array(~np.isin(rows.column("image_id").to_numpy(), skip_ids)))
    if rows.num_rows:
        yield rows.append_column("shard", pa.array(np.full(rows.num_rows, shard, dtype=np.int64)))


def _source_manifest(source_uri: str, out_uri: str, fmt: sources.SourceFormat | None = None) -> str:
    """The source as a manifest: itself, or a folder listed once into ``<out>/source.parquet`` (kept for a
    resumed run, which never lists again)."""
    if fmt is sources.SourceFormat.MANIFEST or (fmt is None and sources.is_manifest(source_uri)):
        return source_uri
    manifest_uri = storage.join(out_uri, ledger.SOURCE_MANIFEST)
    if not storage.exists(manifest_uri):
        sources.index(source_uri, manifest_uri)
    return manifest_uri
