"""Image sources: an ImageFolder (``<root>/<class>/<file>``), a flat folder, or a Parquet manifest.

Every image gets a stable int64 ``image_id``: the first 8 bytes of BLAKE2b over its URI. The same file has
the same id in every run, so predictions, manifests and resumed jobs can be joined on it.
"""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def image_id(uri: str) -> int:
    return int.from_bytes(hashlib.blake2b(uri.encode(), digest_size=8).digest(), "little", signed=True)


def image_ids(uris) -> np.ndarray:
    return np.fromiter((image_id(u) for u in uris), dtype=np.int64, count=len(uris))


def is_manifest(uri: str) -> bool:
    return uri.endswith(".parquet")


def list_folder(root: str) -> list[str]:
    """Every file under ``root``; files that are not images are listed too, so they are counted as rejects."""
    return [u for u in storage.list_files(root) if not posixpath.basename(u).startswith(".")]


def unlabeled_manifest(root: str) -> pa.Table:
    """(image_id, uri) for every file under a folder, in a stable order."""
    uris = list_folder(root)
    return pa.table({"image_id": pa.array(image_ids(uris)), "uri": pa.array(uris, pa.string())})


def image_folder(root: str) -> tuple[pa.Table, list[str]]:
    """(image_id, uri, label) for an ImageFolder, and the class names (sorted sub-folder names)."""
    uris = [u for u in list_folder(root) if u.lower().endswith(IMAGE_EXTENSIONS)]
    base = root.rstrip("/")
    rel = [u[len(base) + 1:] for u in uris]
    names = sorted({r.split("/", 1)[0] for r in rel if "/" in r})
    if not names:
        raise ValueError(f"{root} is not an ImageFolder: expected <root>/<class>/<image> files")
    index = {n: i for i, n in enumerate(names)}
    keep = [i for i, r in enumerate(rel) if "/" in r]
    table = pa.table(
        {
            "image_id": pa.array(image_ids([uris[i] for i in keep])),
            "uri": pa.array([uris[i] for i in keep], pa.string()),
            "label": pa.array([index[rel[i].split("/", 1)[0]] for i in keep], pa.int32()),
        }
    )
    return table, names


def labeled_source(uri: str, class_names: list[str] | None = None) -> tuple[pa.Table, list[str]]:
    """A labeled source as (image_id, uri, label) and its class names.

    ``uri`` is an ImageFolder or a Parquet manifest with ``uri`` and ``label`` columns (class name strings,
    or integer indices when ``class_names`` is given). Passing ``class_names`` pins the label order, so an
    evaluation split is scored in the teacher's class order.
    """
    if is_manifest(uri):
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs, columns=["uri", "label"])
        labels = table.column("label")
        if pa.types.is_integer(labels.type):
            if class_names is None:
                raise ValueError(f"{uri}: integer labels need class names")
            names = class_names
            idx = labels.to_numpy().astype(np.int32)
        else:
            names = class_names or sorted(set(labels.to_pylist()))
            lookup = {n: i for i, n in enumerate(names)}
            unknown = set(labels.to_pylist()) - lookup.keys()
            if unknown:
                raise ValueError(f"{uri}: labels not among the classes: {sorted(unknown)[:5]}")
            idx = np.array([lookup[v] for v in labels.to_pylist()], dtype=np.int32)
        uris = table.column("uri").to_pylist()
        table = pa.table({"image_id": pa.array(image_ids(uris)), "uri": pa.array(uris, pa.string()),
                          "label": pa.array(idx, pa.int32())})
    else:
        table, names = image_folder(uri)
        if class_names is not None:
            if set(names) - set(class_names):
                raise ValueError(f"{uri}: classes not among the model's: {sorted(set(names) - set(class_names))[:5]}")
            remap = np.array([class_names.index(n) for n in names], dtype=np.int32)
            table = table.set_column(2, "label", pa.array(remap[table.column("label").to_numpy()]))
            names = class_names
    if table.num_rows == 0:
        raise ValueError(f"{uri}: no labeled images")
    if (np.asarray(table.column("label")) < 0).any() or (np.asarray(table.column("label")) >= len(names)).any():
        raise ValueError(f"{uri}: label index out of range for {len(names)} classes")
    return table, names
