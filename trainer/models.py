"""Model folders: everything needed to use a model as the next teacher, with no other input.

A model folder holds ``model.safetensors`` (the weights, EMA weights where training kept them) and
``model.json``: the timm architecture name and its keyword arguments, class names, input size and
normalisation, evaluation metrics, and the config and code version that made it.

``import_model`` makes a folder from a model trained elsewhere: a checkpoint file for a timm architecture, or
a timm model's pretrained weights already in the local Hugging Face cache. It never downloads anything: the
folder must be reproducible from what is on the machine, and a labeling job must not depend on the Hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from curation import storage
from trainer import architectures
from trainer.meta import META, WEIGHTS, ModelMeta, check_model_kwargs, load_meta

__all__ = ["META", "WEIGHTS", "ModelMeta", "load_meta", "create", "load", "save", "normalize", "import_model"]


def create(meta: ModelMeta, *, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> torch.nn.Module:
    architectures.check(meta.architecture)
    return timm.create_model(
        meta.architecture,
        pretrained=False,
        num_classes=meta.num_classes,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        **meta.model_kwargs,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save(model: torch.nn.Module, meta: ModelMeta, uri: str) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(uri, WEIGHTS), save_safetensors(state))
    storage.write_bytes(storage.join(uri, META), meta.model_dump_json(indent=2).encode())


def load(uri: str) -> tuple[torch.nn.Module, ModelMeta]:
    """The model in eval mode, on the CPU."""
    meta = load_meta(uri)
    model = create(meta)
    model.load_state_dict(load_safetensors(storage.read_bytes(storage.join(uri, WEIGHTS))))
    return model.eval(), meta


def normalize(pixels: torch.Tensor, meta: ModelMeta) -> torch.Tensor:
    """uint8 NHWC -> float NCHW, normalised as the model expects."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(meta.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(meta.std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)


def scorer(model: torch.nn.Module, meta: ModelMeta) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logits of uint8 NHWC pixels under ``model``, resized first to its input size if they are not."""

    def score(pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[1:3] != (meta.input_size, meta.input_size):
            x = pixels.permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(meta.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
            pixels = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return model(normalize(pixels, meta))

    return score


def predictor(model: torch.nn.Module, meta: ModelMeta) -> Callable[[torch.Tensor], torch.Tensor]:
    """The top-1 class of uint8 NHWC pixels under ``model`` (``scorer``'s argmax)."""
    score = scorer(model, meta)
    return lambda pixels: score(pixels).argmax(dim=1)


def describe(meta: ModelMeta) -> str:
    return json.dumps({"architecture": meta.architecture, "classes": meta.num_classes, **meta.metrics})


# --- import: a model trained elsewhere as a model folder ---------------------------------------------------

# Containers that training scripts commonly wrap a state dict in (timm's train.py, Lightning, plain dicts).
_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


def _code_version() -> str:
    try:
        return version("nstudent")
    except PackageNotFoundError:
        return "unknown"


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a PyTorch state dict loaded with ``weights_only=True`` (no
    pickled code runs). A dict wrapping the state dict under one of ``_WRAPPER_KEYS`` is unwrapped, and a
    ``module.`` prefix (DistributedDataParallel) is dropped. ValueError if it holds no tensors."""
    if path.endswith(".safetensors"):
        state: Any = load_safetensors(storage.read_bytes(path))
    else:
        import io

        try:
            state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad or unsafe pickle
            raise ValueError(
                f"{path}: not a PyTorch state dict loadable with weights_only=True: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: no state dict of tensors found")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _hf_cache_dir() -> str:
    # Resolved at call time, not at huggingface_hub's import, so that HF_HUB_CACHE / HF_HOME set by the
    # caller (or a test) count.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def cached_pretrained(name: str, cache_dir: str | None = None) -> tuple[str, dict[str, Any]]:
    """The local weights file of timm model ``name`` in the Hugging Face hub cache, and the ``config.json``
    cached beside it (``{}`` if none). ``name`` is a timm name, optionally tagged (``resnet50.a1_in1k``; without
    a tag, timm's default), or ``hf-hub:<org>/<repo>`` for a timm model published on the Hub. A lookup in the
    cache's files only: nothing is downloaded. ValueError in one line if there are no Hub weights for it or
    they are not cached."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = cache_dir or _hf_cache_dir()
    filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    if name.startswith("hf-hub:"):
        repo_id, _, revision = name[len("hf-hub:") :].partition("@")
    else:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not cfg.hf_hub_id:
            raise ValueError(f"timm has no Hugging Face Hub weights for {name!r}")
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else filenames
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision or None)
        if isinstance(found, str):
            config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision or None)
            return found, json.loads(Path(config).read_text()) if isinstance(config, str) else {}
    raise ValueError(
        f"the weights of {name!r} ({repo_id}) are not in the Hugging Face cache {cache_dir}; "
        f"nothing is downloaded: fetch them first, e.g. with `hf download {repo_id}`"
    )


def import_model(
    out: str,
    *,
    architecture: str,
    class_names: list[str],
    checkpoint: str | None = None,
    cached: bool = False,
    cache_dir: str | None = None,
    input_size: int | None = None,
    crop_pct: float | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> ModelMeta:
    """Write a model folder at ``out`` from a model trained elsewhere; returns its ``model.json``.

    Exactly one source: ``checkpoint`` (a safetensors file or a ``weights_only`` PyTorch state dict for timm
    ``architecture`` with ``len(class_names)`` outputs; loaded strictly, so a missing, extra or misshapen
    tensor is an error, not a silently random layer), or ``cached=True`` (the pretrained weights of timm model
    ``architecture``, e.g. ``resnet50.a1_in1k``, from the local Hugging Face cache, never downloaded; its
    classifier must have ``len(class_names)`` outputs, since a fresh head would make a teacher that guesses;
    ``hf-hub:<org>/<repo>`` names a timm model published on the Hub, described by its cached config.json).
    Preprocessing not given is taken from timm's pretrained config for the architecture (its input size,
    crop_pct, mean and std), else the model-folder defaults. ``model_kwargs`` go through the same allow-list
    as training's. The folder is checked by loading it back before this returns.
    """
    if (checkpoint is None) == (not cached):
        raise ValueError("give exactly one of a checkpoint file or cached=True")
    if not class_names or len(set(class_names)) != len(class_names) or any(not c for c in class_names):
        raise ValueError("class names must be non-empty and distinct")
    kwargs = check_model_kwargs(dict(model_kwargs or {}))
    file, hub_config = cached_pretrained(architecture, cache_dir) if cached else ("", {})
    # A Hub repo's config.json (timm's save_for_hf) names the architecture and its pretrained config.
    name = hub_config.get("architecture", architecture) if architecture.startswith("hf-hub:") else architecture
    base, _tag = timm.models.split_model_name_tag(name)
    architectures.check(base)
    registered = timm.models.get_pretrained_cfg(name)
    pretrained = {**(registered.to_dict() if registered is not None else {}), **hub_config.get("pretrained_cfg", {})}
    shape: dict[str, Any] = {}
    if pretrained.get("input_size"):
        shape = {
            "input_size": pretrained["input_size"][-1],
            "crop_pct": pretrained["crop_pct"],
            "mean": tuple(pretrained["mean"]),
            "std": tuple(pretrained["std"]),
        }
    given = {"input_size": input_size, "crop_pct": crop_pct, "mean": mean, "std": std}
    shape.update({k: v for k, v in given.items() if v is not None})

    if checkpoint is not None:
        source: dict[str, Any] = {"checkpoint": checkpoint}
        weights = checkpoint
    else:
        source = {"hf_cache": architecture, "file": file}
        # The cached config.json's count is the one the cached weights have; timm's registry may differ.
        outputs = hub_config.get("num_classes", pretrained.get("num_classes"))
        if outputs != len(class_names):
            raise ValueError(
                f"{architecture}'s pretrained classifier has {outputs} outputs, "
                f"but {len(class_names)} class names were given"
            )
        weights = file
    # Built from its timm name alone (never pretrained=True, never an hf-hub: name, either of which may reach
    # the network), then the local weights loaded strictly: a missing or misshapen tensor is an error.
    model = timm.create_model(base, pretrained=False, num_classes=len(class_names), **kwargs)
    try:
        model.load_state_dict(read_checkpoint(weights), strict=True)
    except RuntimeError as e:
        # torch lists every key; the first lines name the kind of mismatch and the first tensors.
        detail = " ".join(str(e).split())[:400]
        raise ValueError(f"{weights} does not fit {base} with {len(class_names)} classes: {detail}") from None

    meta = ModelMeta(
        architecture=base,
        model_kwargs=kwargs,
        class_names=list(class_names),
        parameters=count_parameters(model),
        config={"imported_from": source},
        code_version=_code_version(),
        **shape,
    )
    save(model.eval(), meta, out)
    load(out)  # a folder that does not load back must not be reported as made
    return meta
