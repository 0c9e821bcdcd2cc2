"""Model folders: everything needed to use a model as the next teacher, with no other input.

A model folder holds ``model.safetensors`` (the weights, EMA weights where training kept them) and
``model.json``: the timm architecture name and its keyword arguments, class names, input size and
normalisation, evaluation metrics, and the config and code version that made it.
"""

from __future__ import annotations

import json

import timm
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from service import storage
from trainer import architectures
from trainer.meta import META, WEIGHTS, ModelMeta, load_meta

__all__ = ["META", "WEIGHTS", "ModelMeta", "load_meta", "create", "load", "save", "normalize"]


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


def describe(meta: ModelMeta) -> str:
    return json.dumps({"architecture": meta.architecture, "classes": meta.num_classes, **meta.metrics})
