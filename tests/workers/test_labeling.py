import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import schema, sources
from tests.helpers import BAD_FILES, untrained_model, write_edge_files, write_pool
from trainer import models
from workers.labeling import LabelConfig, TeacherPredictor, label, read_and_decode


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("teacher") / "model")
    untrained_model(uri)
    return uri


def test_decode_reasons_without_ray(tmp_path):
    good, bad = write_pool(str(tmp_path), good=4)
    uris = good + list(bad) + [str(tmp_path / "does-not-exist.png")]
    out = read_and_decode(
        {"image_id": np.arange(len(uris)), "uri": np.array(uris, dtype=object)}, size=32, crop_pct=1.0
    )
    assert out["pixels"].shape == (len(uris), 32, 32, 3)
    assert out["reason"].tolist() == [""] * 4 + list(bad.values()) + ["missing"]
    assert all(d for d in out["detail"][4:])
    assert out["pixels"][:4].any(axis=(1, 2, 3)).all()


def test_five_percent_bad_files_are_all_rejected_with_reasons(ray_cluster, tmp_path, teacher):
    good, bad = write_pool(str(tmp_path / "pool"), good=95)
    assert len(bad) / (len(good) + len(bad)) == 0.05
    result = label(
        str(tmp_path / "pool"),
        teacher,
        str(tmp_path / "labels"),
        LabelConfig(top_k=3, batch_size=16),
        teacher_id="gen-0",
    )

    preds = pq.read_table(result.predictions_uri)
    rejects = pq.read_table(result.rejects_uri)
    assert preds.schema.equals(schema.PREDICTIONS)
    assert rejects.schema.equals(schema.REJECTS)
    assert sorted(preds.column("uri").to_pylist()) == sorted(good)
    assert dict(zip(rejects.column("uri").to_pylist(), rejects.column("reason").to_pylist())) == bad
    assert all(rejects.column("detail").to_pylist())
    assert result.images == 100 and result.predicted == 95
    expected_reasons = {}
    for reason in bad.values():
        expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    assert result.rejected == expected_reasons

    # ids are the stable hash of the URI; soft labels are a proper top-k
    assert preds.column("image_id").to_pylist() == [sources.image_id(u) for u in preds.column("uri").to_pylist()]
    probs = np.stack(preds.column("topk_probs").to_numpy(zero_copy_only=False)).astype(np.float32)
    classes = np.stack(preds.column("topk_classes").to_numpy(zero_copy_only=False))
    assert probs.shape == (95, 3) and (np.diff(probs, axis=1) <= 1e-3).all()
    assert (probs.sum(axis=1) <= 1.0 + 1e-2).all()
    assert (classes[:, 0] == preds.column("label").to_numpy()).all()
    assert np.allclose(probs[:, 0], preds.column("confidence").to_numpy(), atol=1e-3)
    assert set(preds.column("teacher").to_pylist()) == {"gen-0"}


def test_manifest_source_counts_missing_objects(ray_cluster, tmp_path, teacher):
    good, _ = write_pool(str(tmp_path / "pool"), good=10)
    missing = [str(tmp_path / "pool" / f"gone{i}.png") for i in range(3)]
    manifest = str(tmp_path / "pool.parquet")
    pq.write_table(pa.table({"uri": good + missing}), manifest)
    result = label(manifest, teacher, str(tmp_path / "labels"))
    assert result.predicted == 10 and result.rejected == {"missing": 3}
    rejects = pq.read_table(result.rejects_uri)
    assert sorted(rejects.column("uri").to_pylist()) == sorted(missing)
    assert os.path.exists(os.path.join(tmp_path, "labels", "labeling.json"))
    # a second run finds every row committed: nothing is labeled again, no duplicate rows
    again = label(manifest, teacher, str(tmp_path / "labels"))
    assert again.resumed == 13 and (again.predicted, again.rejected) == (10, {"missing": 3})
    assert pq.read_table(result.predictions_uri).num_rows == 10
    assert pq.read_table(result.rejects_uri).num_rows == 3


def test_bad_files_cover_every_reason():
    assert {r for _, r in BAD_FILES.values()} == {"empty", "not_an_image", "corrupt"}


def test_edge_files_are_kept_or_rejected_with_their_reason(ray_cluster, tmp_path, teacher):
    """Strips, a decompression bomb, 16-bit, EXIF-rotated, transparent, CMYK and animated images and broken
    files: the job finishes and each file is in the predictions or in the rejects with its reason."""
    expected = write_edge_files(str(tmp_path / "pool"))
    good, bad = write_pool(str(tmp_path / "pool" / "plain"), good=6)
    expected.update({p: "" for p in good} | bad)
    # a 1-row decode batch would hide one image failing its whole batch: several share each one here
    result = label(str(tmp_path / "pool"), teacher, str(tmp_path / "labels"), LabelConfig(top_k=3, batch_size=4))

    preds = pq.read_table(result.predictions_uri)
    rejects = pq.read_table(result.rejects_uri)
    kept = sorted(p for p, r in expected.items() if not r)
    assert sorted(preds.column("uri").to_pylist()) == kept
    assert dict(zip(rejects.column("uri").to_pylist(), rejects.column("reason").to_pylist())) == {
        p: r for p, r in expected.items() if r
    }
    assert result.rejected == {"bad_geometry": 2, "corrupt": 6, "empty": 2, "not_an_image": 2, "too_large": 1}
    assert result.predicted == len(kept) == 11


def test_top_k_zero_keeps_the_teacher_s_full_distribution(tmp_path, teacher):
    """``top_k: 0`` writes every class's probability, summing to 1; a smaller k writes that many, best first."""
    good, _ = write_pool(str(tmp_path), good=3)
    batch = read_and_decode({"image_id": np.arange(3), "uri": np.array(good, dtype=object)}, size=32, crop_pct=1.0)
    num_classes = models.load_meta(teacher).num_classes
    full = TeacherPredictor(teacher, "t", top_k=0, torch_threads=1)(batch)
    probs = np.array(full.column("topk_probs").to_pylist(), dtype=np.float64)
    assert probs.shape == (3, num_classes) and np.allclose(probs.sum(axis=1), 1.0, atol=5e-3)
    classes = full.column("topk_classes").to_pylist()
    assert all(sorted(c) == list(range(num_classes)) for c in classes)
    top2 = TeacherPredictor(teacher, "t", top_k=2, torch_threads=1)(batch)
    assert top2.column("topk_classes").to_pylist() == [c[:2] for c in classes]


def test_the_jobs_driver_never_imports_torch(tmp_path, teacher):
    """A labeling job's driver plans and commits without torch or timm (4 s of CPU before the first batch on a
    small node): only the teacher actors load the model. Its own process and cluster, so nothing is imported
    beforehand."""
    good, _ = write_pool(str(tmp_path / "pool"), good=6)
    temp_dir = tempfile.mkdtemp(prefix="nst-drv-", dir="/tmp")  # Ray's socket paths must stay short
    code = (
        "import sys\n"
        "from service import cluster\n"
        "from workers.labeling import label\n"
        f"cluster.connect('local', num_cpus=1, temp_dir={temp_dir!r})\n"
        f"result = label({str(tmp_path / 'pool')!r}, {teacher!r}, {str(tmp_path / 'labels')!r})\n"
        "print(result.predicted, sorted(m for m in ('torch', 'timm') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[-2] == "6 []"
