"""Curation of 20M synthetic prediction rows with 1,000 classes: rows/s and peak memory, against pandas.

    .venv/bin/python bench/curation_scale.py

Writes 20,000,000 prediction rows once (the PREDICTIONS schema: URIs like a bucket's keys, top-5 soft labels in
float16; class sizes and confidences skewed, 1,000 classes) as 100 Parquet files of 200,000 rows.

- ``ray``: ``workers.curate.curate`` (two streaming passes and a written-manifest check) on a private 2-CPU
  Ray cluster in a child process; the parent samples the memory of the child's whole process tree (driver,
  GCS, raylet, workers) every 0.2 s.
- ``pandas``: the in-memory version a user would write (``pd.read_parquet`` of all files, a groupby
  histogram, per-class thresholds, copies, ``to_parquet``) in a child process, sampled the same way, on the
  first ``--pandas-rows`` rows (it holds them all in memory; see the figures for how its peak grows).
- ``check``: the manifest the Ray job wrote against the reference implementation (``curation.balance``'s pure
  functions over all 20M rows' labels and confidences): same thresholds, the same (image_id, label, copies)
  for every row, all columns equal on a 1% subsample of rows, and the same checksum; the pandas manifest
  against the reference on its rows.

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
CLASSES = 1000
TOP_K = 5
ROWS_PER_FILE = 200_000


def class_names() -> list[str]:
    return [f"c{i:03d}" for i in range(CLASSES)]


def predictions_chunk(index: int, rows: int, seed: int) -> pa.Table:  # noqa: F821 - imported where used
    """One file of synthetic predictions: class sizes follow a log-normal, confidences a per-class beta."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from curation import schema

    rng = np.random.default_rng([seed, index])
    class_rng = np.random.default_rng(seed)  # the same class mix in every file
    weights = class_rng.lognormal(0.0, 1.0, CLASSES)
    alpha = class_rng.uniform(1.5, 8.0, CLASSES)
    label = rng.choice(CLASSES, size=rows, p=weights / weights.sum()).astype(np.int32)
    confidence = rng.beta(alpha[label], 2.0).astype(np.float32)
    first = np.int64(index) * rows
    image_id = (np.arange(first, first + rows, dtype=np.int64) * np.int64(0x4F1BBCDCBFA53E0B)) ^ np.int64(seed)
    uri = pc.binary_join_element_wise(
        "s3://unlabeled-pool/images/", pc.cast(pa.array(np.arange(first, first + rows)), pa.string()), ".jpg", ""
    )
    # top-k: the label first with its confidence, then k-1 other classes sharing what is left, decreasing
    others = (label[:, None] + rng.integers(1, CLASSES, (rows, TOP_K - 1))) % CLASSES
    rest = np.sort(rng.dirichlet(np.ones(TOP_K), rows)[:, : TOP_K - 1], axis=1)[:, ::-1]
    rest = rest * (1 - confidence[:, None]) * 0.9
    probs = np.concatenate([confidence[:, None], np.minimum(rest, confidence[:, None])], axis=1)
    classes = np.concatenate([label[:, None], others], axis=1).astype(np.int32)
    offsets = pa.array(np.arange(0, (rows + 1) * TOP_K, TOP_K, dtype=np.int32))
    return pa.table(
        {
            "image_id": pa.array(image_id),
            "uri": uri,
            "label": pa.array(label),
            "confidence": pa.array(confidence),
            "topk_classes": pa.ListArray.from_arrays(offsets, pa.array(classes.ravel())),
            "topk_probs": pa.ListArray.from_arrays(offsets, pa.array(probs.ravel().astype(np.float16))),
            "teacher": pa.array(["gen-0"] * rows),
        },
        schema=schema.PREDICTIONS,
    )


def _write_chunk(job: tuple[str, int, int]) -> None:
    import pyarrow.parquet as pq

    folder, index, seed = job
    pq.write_table(
        predictions_chunk(index, ROWS_PER_FILE, seed),
        os.path.join(folder, f"part-{index:05d}.parquet"),
        compression="zstd",
    )


def predictions_folder(rows: int, seed: int = 0) -> str:
    folder = _common.DATA_DIR / f"predictions-{rows}"
    stamp = folder / "made.json"
    params = {"rows": rows, "rows_per_file": ROWS_PER_FILE, "seed": seed, "classes": CLASSES}
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return str(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_write_chunk, [(str(folder), i, seed) for i in range(rows // ROWS_PER_FILE)]))
    stamp.write_text(json.dumps(params))
    return str(folder)


def files(folder: str, rows: int | None = None) -> list[str]:
    names = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
    if rows is not None:
        names = names[: -(-rows // ROWS_PER_FILE)]
    return [os.path.join(folder, f) for f in names]


# ---------------------------------------------------------------------------------------------- the phases


def phase_ray(args) -> dict:
    from curation.balance import CurationConfig
    from workers.curate import curate

    t0 = time.perf_counter()
    with _common.ray_cluster(num_cpus=args.cpus):
        cluster_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        stats = curate(args.predictions, args.out, class_names(), CurationConfig(seed=args.seed), dataset_id="bench")
        wall = time.perf_counter() - t1
    return {
        "rows": stats.images_decoded,
        "seconds": wall,
        "rows_per_second": stats.images_decoded / wall,
        "cluster_start_seconds": cluster_seconds,
        "manifest_rows": stats.manifest_rows,
        "manifest_copies": stats.manifest_copies,
        "checksum": stats.manifest_checksum,
        "images_per_class": stats.images_per_class,
    }


def phase_pandas(args) -> dict:
    """What a user would write with pandas: everything in one DataFrame."""
    import numpy as np
    import pandas as pd

    from curation import balance

    t0 = time.perf_counter()
    df = pd.concat([pd.read_parquet(f) for f in files(args.predictions, args.rows)], ignore_index=True)
    df = df.iloc[: args.rows]
    floor, seed = 0.3, args.seed
    bins = np.clip(np.floor(df["confidence"].to_numpy(np.float64) * 100 + 1e-4), 0, 99).astype(np.int64)
    df["bin"] = bins
    hist = (
        df.groupby(["label", "bin"])
        .size()
        .unstack(fill_value=0)
        .reindex(index=range(CLASSES), columns=range(100), fill_value=0)
        .to_numpy()
    )
    # thresholds: walking the bins down from 1.0, the first bin where the count reaches K, never under the floor
    at_or_above = hist[:, ::-1].cumsum(axis=1)[:, ::-1]
    floor_bin = int(np.floor(floor * 100 + 1e-4))
    k = max(1, int(round(at_or_above[:, floor_bin].sum() / CLASSES)))
    threshold = np.full(CLASSES, floor_bin)
    for c in range(CLASSES):
        reached = np.nonzero(at_or_above[c, floor_bin:] >= k)[0]
        if reached.size:
            threshold[c] = floor_bin + reached[-1]
    eligible = at_or_above[np.arange(CLASSES), threshold]
    ratio = np.where(eligible > 0, k / np.maximum(eligible, 1), 0.0)
    labels = df["label"].to_numpy()
    whole = np.floor(ratio[labels])
    extra = balance._uniform(df["image_id"].to_numpy(), seed) < ratio[labels] - whole  # the same seeded draw
    df["copies"] = np.where(bins >= threshold[labels], whole + extra, 0).astype(np.int32)
    kept = df[df["copies"] > 0].drop(columns=["bin"])
    os.makedirs(args.out, exist_ok=True)
    kept.to_parquet(os.path.join(args.out, "manifest.parquet"), compression="zstd", index=False)
    wall = time.perf_counter() - t0
    return {
        "rows": len(df),
        "seconds": wall,
        "rows_per_second": len(df) / wall,
        "manifest_rows": len(kept),
        "images_per_class": k,
    }


def phase_check(args) -> dict:
    """The Ray manifest (and the pandas one) against curation.balance's reference functions."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from curation import balance
    from curation.balance import CurationConfig

    config = CurationConfig(seed=args.seed)
    cols = ["image_id", "label", "confidence"]
    all_files = files(args.predictions)
    table = pa.concat_tables([pq.read_table(f, columns=cols) for f in all_files]).combine_chunks()
    plan = balance.plan(
        balance.class_histogram(table.column("label").to_numpy(), table.column("confidence").to_numpy(), CLASSES),
        config,
    )
    reference = balance.assign_copies(table, plan, config.seed).select(["image_id", "label", "copies"])
    reference = reference.sort_by("image_id")
    del table
    got = pq.read_table(os.path.join(args.out, "manifest"), columns=["image_id", "label", "copies"]).sort_by("image_id")
    stats = json.loads(Path(args.out, "stats.json").read_text())
    ids = reference.column("image_id").to_numpy()
    digest = balance.rows_digest(ids, reference.column("label").to_numpy(), reference.column("copies").to_numpy())
    out = {
        "reference_rows": reference.num_rows,
        "thresholds_equal": [c["threshold"] for c in stats["classes"]] == (plan.threshold_bin / 100).tolist(),
        "all_rows_equal": got.equals(reference),
        "checksum_equal": stats["manifest_checksum"] == f"{digest:016x}",
    }
    # every column of a 1% subsample of rows (those whose id's hash falls under 0.01), file by file
    sample_ids = ids[balance._uniform(ids, 12345) < 0.01]
    ref_rows, got_rows = [], []
    for f in all_files:
        part = pq.read_table(f)
        part = part.filter(pc.is_in(part.column("image_id"), pa.array(sample_ids)))
        ref_rows.append(balance.assign_copies(part, plan, config.seed))
    for f in sorted(Path(args.out, "manifest").glob("*.parquet")):
        part = pq.read_table(f)
        got_rows.append(part.filter(pc.is_in(part.column("image_id"), pa.array(sample_ids))))
    ref_sample = pa.concat_tables(ref_rows).sort_by("image_id")
    got_sample = pa.concat_tables(got_rows).sort_by("image_id").cast(ref_sample.schema)
    out["subsample_rows"] = ref_sample.num_rows
    out["subsample_all_columns_equal"] = got_sample.equals(ref_sample)
    if args.pandas_out:
        rows = args.rows
        part = pa.concat_tables([pq.read_table(f, columns=cols) for f in files(args.predictions, rows)]).slice(0, rows)
        part_plan = balance.plan(
            balance.class_histogram(part.column("label").to_numpy(), part.column("confidence").to_numpy(), CLASSES),
            config,
        )
        ref = balance.assign_copies(part, part_plan, config.seed).select(["image_id", "label", "copies"])
        pandas_rows = pq.read_table(
            os.path.join(args.pandas_out, "manifest.parquet"), columns=["image_id", "label", "copies"]
        )
        out["pandas_rows_equal"] = pandas_rows.sort_by("image_id").equals(ref.sort_by("image_id"))
    return out


PHASES = {"ray": phase_ray, "pandas": phase_pandas, "check": phase_check}


# ------------------------------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--pandas-rows", type=int, default=4_000_000, help="rows the pandas version is run on")
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ways", default="ray,pandas")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--predictions", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--pandas-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        _common.phase_result(PHASES[args.phase](args))
        return

    machine = _common.machine()
    t = time.perf_counter()
    predictions = predictions_folder(args.rows)
    generate_seconds = time.perf_counter() - t
    size = sum(os.path.getsize(f) for f in files(predictions))
    scratch = Path(_common.DATA_DIR, "curation-out")
    shutil.rmtree(scratch, ignore_errors=True)
    common = ["--predictions", predictions, "--seed", str(args.seed), "--cpus", str(args.cpus)]
    ways = args.ways.split(",")
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    for r in range(args.repeats):
        for way in ways:
            out = str(scratch / f"{way}-{r}")
            extra = ["--rows", str(args.pandas_rows)] if way == "pandas" else []
            load = _common.load()
            result = _common.run_phase(SCRIPT, ["--phase", way, "--out", out, *common, *extra], memory=True)
            result["load_average_before"] = load
            runs[way].append(result)
            print(
                f"repeat {r + 1} {way}: {result['rows_per_second']:.0f} rows/s, {result['memory']} (load {load})",
                file=sys.stderr,
                flush=True,
            )
    check = {}
    if "ray" in ways:
        pandas_out = []
        if "pandas" in ways:
            pandas_out = ["--pandas-out", str(scratch / "pandas-0"), "--rows", str(args.pandas_rows)]
        check = _common.run_phase(SCRIPT, ["--phase", "check", "--out", str(scratch / "ray-0"), *common, *pandas_out])

    def med(way: str, key: str) -> float:
        return _common.median([x["memory"][key] if key.startswith("peak") else x[key] for x in runs[way]], 1)

    summary = {
        w: {k: med(w, k) for k in ("rows", "rows_per_second", "seconds", "peak_rss_mib", "peak_pss_mib")} for w in runs
    }
    for w in runs:
        summary[w]["bytes_per_row_at_peak_rss"] = round(summary[w]["peak_rss_mib"] * 2**20 / summary[w]["rows"], 1)
    _common.emit(
        {
            "benchmark": "curation_scale",
            "machine": machine,
            "config": {
                "rows": args.rows,
                "classes": CLASSES,
                "top_k": TOP_K,
                "files": len(files(predictions)),
                "rows_per_file": ROWS_PER_FILE,
                "predictions_bytes_on_disk": size,
                "pandas_rows": args.pandas_rows,
                "ray_cpus": args.cpus,
                "repeats": args.repeats,
                "generate_seconds": round(generate_seconds, 1),
            },
            "median": summary,
            "check": check,
            "bar": {
                "peak under 3 GB (RSS)": "ray" in summary and summary["ray"]["peak_rss_mib"] * 2**20 < 3e9,
                "equal to the reference": bool(check) and all(v for v in check.values() if isinstance(v, bool)),
            },
            "runs": runs,
        }
    )


if __name__ == "__main__":
    main()
