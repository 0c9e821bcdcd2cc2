"""The size of a prediction row at 1,000 classes and top-5 float16 soft labels (the figure in the README)."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import schema, sources


def predictions(n: int, classes: int = 1000, k: int = 5, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    uris = [f"s3://pool-bucket/images/{rng.bytes(8).hex()}.jpg" for _ in range(n)]
    top = np.stack([rng.choice(classes, k, replace=False) for _ in range(n)]).astype(np.int32)
    probs = -np.sort(-rng.dirichlet(np.ones(k * 4), n)[:, :k], axis=1).astype(np.float32)
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.table(
        {
            "image_id": pa.array(sources.image_ids(uris)),
            "uri": pa.array(uris, pa.string()),
            "label": pa.array(top[:, 0]),
            "confidence": pa.array(probs[:, 0]),
            "topk_classes": pa.ListArray.from_arrays(offsets, pa.array(top.ravel())),
            "topk_probs": pa.ListArray.from_arrays(offsets, pa.array(probs.ravel().astype(np.float16), pa.float16())),
            "teacher": pa.array(["s3://models/gen-2/model"] * n),
        },
        schema=schema.PREDICTIONS,
    )


def parquet_bytes(table: pa.Table, compression: str) -> tuple[int, dict[str, int]]:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
    columns: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            name = col.path_in_schema.split(".")[0]
            columns[name] = columns.get(name, 0) + col.total_compressed_size
    return len(buf.getvalue()), columns


def test_prediction_row_bytes_at_1000_classes_top5_fp16():
    n = 100_000
    table = predictions(n)
    soft = ("topk_classes", "topk_probs")
    # in memory: 5 x int32 + 5 x float16 + two int32 list offsets
    assert sum(table.column(c).nbytes for c in soft) / n == 5 * 4 + 5 * 2 + 2 * 4
    assert 120 < table.nbytes / n < 140
    total, columns = parquet_bytes(table, "zstd")
    assert total / n < 45  # README: about 41 bytes a row
    assert sum(columns[c] for c in soft) / n < 20  # README: about 15
    plain, _ = parquet_bytes(table, "none")
    assert plain / n < 90 and plain > 1.8 * total
    assert total / n < 1000 * 4 / 80  # against 4,000 bytes for a full float32 softmax
