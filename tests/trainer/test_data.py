"""The order of the training stream: copies spread over each pass, passes that differ, classes mixed."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import sources
from trainer import data


def block(copies: list[int]) -> pa.Table:
    n = len(copies)
    return pa.table(
        {"uri": [f"/pool/{i:05d}.png" for i in range(n)], "label": list(range(n)), "copies": copies},
    )


def test_each_pass_is_a_seeded_permutation_of_the_copies():
    rows = block([3, 1, 2, 1])
    out = data._expand(rows, times=3, seed=5).column("label").to_pylist()
    passes = [out[i * 7 : (i + 1) * 7] for i in range(3)]
    assert all(sorted(p) == [0, 0, 0, 1, 2, 2, 3] for p in passes)
    assert data._expand(rows, times=3, seed=5).column("label").to_pylist() == out
    assert data._expand(rows, times=3, seed=6).column("label").to_pylist() != out


def test_copies_are_spread_over_the_pass_and_passes_differ():
    rows = block([2] * 1000)
    out = np.array(data._expand(rows, times=2, seed=0).column("label"))
    first, second = out[:2000], out[2000:]
    # Copies side by side (as a repeat in place gives, at every other position) happen only by chance.
    assert (first[1:] == first[:-1]).sum() < 10
    assert (first != second).mean() > 0.99
    assert data._expand(block([]), times=3, seed=0).num_rows == 0


def largest_class_share(labels: np.ndarray, batch: int) -> float:
    batches = labels[: len(labels) // batch * batch].reshape(-1, batch)
    return float(np.mean([np.bincount(b).max() / batch for b in batches]))


def test_a_class_sorted_folder_gives_batches_as_mixed_as_a_random_draw(tmp_path):
    """The demo's pool: 10 class folders listed in order, labeled in the order of the listing, 2 copies each.
    Without any shuffle buffer, the largest class's share of a 48-image batch stays within 1.2 times of what a
    random draw of the same rows gives (the listing is ordered by image id, the copies spread by pass)."""
    pool = tmp_path / "pool"
    for c in range(10):
        os.makedirs(pool / str(c))
        for i in range(380):
            (pool / str(c) / f"{i:04d}.png").write_bytes(b"")
    out = str(tmp_path / "source.parquet")
    sources.index(str(pool), out)
    uris = pq.read_table(out).column("uri").to_pylist()
    labels = [int(u.split("/")[-2]) for u in uris]
    manifest = pa.table({"uri": uris, "label": labels, "copies": [2] * len(uris)})
    stream = np.array(data._expand(manifest, times=1, seed=0).column("label"))
    random = np.random.default_rng(0).permutation(stream)
    assert largest_class_share(stream, 48) <= 1.2 * largest_class_share(random, 48)
    # As listed by name, the same rows would give batches of mostly one class.
    by_name = np.repeat(np.sort(labels), 2)
    assert largest_class_share(by_name, 48) > 0.9
