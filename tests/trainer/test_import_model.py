"""``nstudent import-model``: a model trained elsewhere becomes a model folder that loads and predicts as the
original did, from a checkpoint file or from a Hugging Face cache, with nothing downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from service.cli import app
from trainer import models

CLASSES = [f"c{i}" for i in range(5)]


def _trained(num_classes: int) -> torch.nn.Module:
    """A test_resnet moved off its initialisation by a few SGD steps on random data, so that a folder holding
    freshly initialised weights could not pass for it."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(4):
        x = torch.randn(8, 3, 64, 64)
        y = torch.randint(0, num_classes, (8,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _same_predictions(original: torch.nn.Module, folder: str) -> None:
    loaded, meta = models.load(folder)
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x))
    # And unlike a fresh model of the same architecture (the weights really came from the checkpoint).
    fresh = models.create(meta).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), original(x))


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_checkpoint_import_predicts_as_the_original(tmp_path: Path, kind: str) -> None:
    model = _trained(len(CLASSES))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if kind == "safetensors":
        path = tmp_path / "ckpt.safetensors"
        save_file(state, str(path))
    else:
        # Wrapped as timm's and many training scripts' checkpoints are, with a DDP prefix.
        path = tmp_path / "ckpt.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    out = str(tmp_path / "model")
    meta = models.import_model(
        out,
        architecture="test_resnet",
        class_names=CLASSES,
        checkpoint=str(path),
        input_size=64,
        crop_pct=0.875,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    assert meta == models.load_meta(out)
    assert (meta.architecture, meta.class_names, meta.input_size, meta.crop_pct) == ("test_resnet", CLASSES, 64, 0.875)
    assert (meta.mean, meta.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert meta.parameters == models.count_parameters(model)
    _same_predictions(model, out)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in _trained(3).state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="does not fit test_resnet with 5 classes"):
        models.import_model(str(tmp_path / "m"), architecture="test_resnet", class_names=CLASSES, checkpoint=str(path))
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="not allowed"):
        models.import_model(
            str(tmp_path / "m"),
            architecture="test_resnet",
            class_names=CLASSES,
            checkpoint=str(path),
            model_kwargs={"pretrained_cfg": "x"},
        )


def _write_hub_cache(hub: Path, model: torch.nn.Module, repo_id: str) -> None:
    """The hub cache layout huggingface_hub reads offline: models--<org>--<name>/snapshots/<commit>/<files>,
    with refs/main naming the commit; the files are what timm's save_for_hf writes (config.json and
    model.safetensors), as a download would have left them."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    timm.models.save_for_hf(model, str(snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hf_cache_import_offline_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A "pretrained" test_resnet with 5 outputs, cached under its timm Hub id in a private HF_HOME.
    name = "test_resnet.r160_in1k"
    model = _trained(len(CLASSES))
    model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": len(CLASSES)}
    home = tmp_path / "hf"
    _write_hub_cache(home / "hub", model, "timm/test_resnet.r160_in1k")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the command sets it: restored after the test
    # Any attempt to reach the Hub would fail loudly rather than quietly download.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    # timm's registry says 1,000 outputs; the cached config.json, as for a fine-tuned model, says 5.

    out = str(tmp_path / "model")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    result = CliRunner().invoke(
        app,
        [
            "import-model",
            out,
            "-a",
            name,
            "--from-hf-cache",
            "--classes-file",
            str(tmp_path / "classes.txt"),
            "--num-classes",
            "5",
            "--input-size",
            "64",
        ],
    )
    assert result.exit_code == 0, result.output
    meta = models.load_meta(out)
    # Preprocessing not given comes from timm's pretrained config: crop_pct 0.95, mean and std 0.5.
    assert (meta.architecture, meta.input_size, meta.crop_pct, meta.mean) == ("test_resnet", 64, 0.95, (0.5, 0.5, 0.5))
    assert meta.config["imported_from"]["hf_cache"] == name
    _same_predictions(model, out)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_hf_cache_miss_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    result = CliRunner().invoke(
        app,
        [
            "import-model",
            str(tmp_path / "m"),
            "-a",
            "test_resnet",
            "--from-hf-cache",
            "--classes",
            ",".join(f"k{i}" for i in range(1000)),
        ],
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "not in the Hugging Face cache" in lines[0] and "nothing is downloaded" in lines[0]
    assert not (tmp_path / "m").exists()


def test_hf_hub_repo_import_reads_its_cached_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fine-tuned timm model published as its own Hub repo: config.json names the architecture.
    model = _trained(len(CLASSES))
    _write_hub_cache(tmp_path / "hub", model, "acme/digits-resnet")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = str(tmp_path / "model")
    meta = models.import_model(out, architecture="hf-hub:acme/digits-resnet", class_names=CLASSES, cached=True)
    assert meta.architecture == "test_resnet"
    _same_predictions(model, out)


def test_imported_folder_labels_a_pool_as_a_teacher(ray_cluster, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from tests.helpers import write_pool
    from workers.labeling import LabelConfig, label

    model = _trained(len(CLASSES))
    ckpt = tmp_path / "ckpt.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    teacher = str(tmp_path / "model")
    models.import_model(teacher, architecture="test_resnet", class_names=CLASSES, checkpoint=str(ckpt), input_size=32)
    good, _ = write_pool(str(tmp_path / "pool"), good=12)
    result = label(str(tmp_path / "pool"), teacher, str(tmp_path / "labels"), LabelConfig(top_k=2, batch_size=8))
    assert result.predicted == len(good)
    labels = pq.read_table(result.predictions_uri).column("label").to_pylist()
    assert len(labels) == len(good) and all(0 <= c < len(CLASSES) for c in labels)
