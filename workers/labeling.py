"""Labeling: Ray Data streams an unlabeled source through teacher actors and writes soft labels.

read manifest (image_id, uri) -> [tasks] read bytes + decode + resize -> [actors] teacher forward pass
-> [write tasks] predictions/*.parquet and rejects/*.parquet

Decoding happens per image in CPU tasks, upstream of the actors: a file that cannot be read or decoded
becomes a reject row with its reason and never fails a block. The teacher runs un-noised (eval mode, the
EMA weights it was saved with). Actors take GPUs where the cluster has them; on a CPU-only cluster they
take a fraction of a CPU each, so the read and decode tasks always have CPUs left.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from pydantic import BaseModel, Field

from curation import imaging, schema, sources
from service import storage
from trainer import models

log = logging.getLogger(__name__)

# Rows per read/decode task batch: small enough that a block of decoded 224px images stays ~20 MB.
DECODE_BATCH_SIZE = int(os.environ.get("NSTUDENT_DECODE_BATCH_SIZE", "128"))


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


class LabelResult(BaseModel):
    predictions_uri: str
    rejects_uri: str
    images: int = Field(description="rows read from the source")
    predicted: int
    rejected: dict[str, int] = Field(description="rejects by reason")


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
    return {
        "image_id": batch["image_id"],
        "uri": batch["uri"],
        "pixels": pixels,
        "reason": np.array(reasons, dtype=object),
        "detail": np.array(details, dtype=object),
    }


class TeacherPredictor:
    """A teacher model in an actor: pixels in, top-k soft labels out."""

    def __init__(self, model_uri: str, teacher_id: str, top_k: int, torch_threads: int | None):
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
            }
        )


def _scatter(values: np.ndarray, ok: np.ndarray, fill: Any) -> np.ndarray:
    out = np.full((len(ok), *values.shape[1:]), fill, dtype=values.dtype)
    out[ok] = values
    return out


class LabelsDatasink(ray.data.Datasink):
    """Each write task writes one predictions file and one rejects file, and returns its counts."""

    def __init__(self, out_uri: str):
        self.out_uri = out_uri
        self.write_id = uuid.uuid4().hex[:12]

    def write(self, blocks: Iterable[pa.Table], ctx) -> dict[str, int]:
        counts: Counter[str] = Counter()
        name = f"part-{self.write_id}-{ctx.task_idx:06d}.parquet"
        preds_uri = storage.join(self.out_uri, "predictions", name)
        rejects_uri = storage.join(self.out_uri, "rejects", name)
        with _LazyWriter(preds_uri, schema.PREDICTIONS) as preds, _LazyWriter(rejects_uri, schema.REJECTS) as rejects:
            for block in blocks:
                ok = pc.equal(block.column("reason"), "")
                good = block.filter(ok)
                if good.num_rows:
                    preds.write(good.select(schema.PREDICTIONS.names).cast(schema.PREDICTIONS))
                    counts["predicted"] += good.num_rows
                bad = block.filter(pc.invert(ok))
                if bad.num_rows:
                    rejects.write(bad.select(schema.REJECTS.names).cast(schema.REJECTS))
                    counts.update(f"rejected:{r}" for r in bad.column("reason").to_pylist())
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
) -> LabelResult:
    """Label every image of ``source_uri`` (a folder, or a Parquet manifest with ``uri`` and optional
    ``image_id`` columns) with the model at ``model_uri``; write ``<out>/predictions`` and ``<out>/rejects``."""
    config = config or LabelConfig()
    meta = models.load_meta(model_uri)
    ds = _source_dataset(source_uri, out_uri)
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
    ds = ds.map_batches(
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
    for part in ("predictions", "rejects"):  # a re-run replaces the outputs, never appends to them
        fs, path = storage.resolve(storage.join(out_uri, part))
        fs.delete_dir_contents(path, missing_dir_ok=True)
    sink = LabelsDatasink(out_uri)
    ds.write_datasink(sink)
    counts = getattr(sink, "counts", {})
    rejected = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("rejected:")}
    result = LabelResult(
        predictions_uri=storage.join(out_uri, "predictions"),
        rejects_uri=storage.join(out_uri, "rejects"),
        images=counts.get("predicted", 0) + sum(rejected.values()),
        predicted=counts.get("predicted", 0),
        rejected=rejected,
    )
    storage.write_json(storage.join(out_uri, "labeling.json"), result.model_dump())
    return result


def _source_dataset(source_uri: str, out_uri: str) -> ray.data.Dataset:
    if sources.is_manifest(source_uri):
        fs, path = storage.resolve(source_uri)
        ds = ray.data.read_parquet(path, filesystem=fs)
        if "image_id" not in ds.columns():
            ds = ds.map_batches(
                lambda t: t.append_column("image_id", pa.array(sources.image_ids(t.column("uri").to_pylist()))),
                batch_format="pyarrow",
            )
        return ds.select_columns(["image_id", "uri"])
    # A folder is listed once into a manifest beside the outputs; big pools should come as manifests.
    manifest_uri = storage.join(out_uri, "source.parquet")
    fs, path = storage.resolve(manifest_uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(sources.unlabeled_manifest(source_uri), path, filesystem=fs)
    return ray.data.read_parquet(path, filesystem=fs)
