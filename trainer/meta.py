"""A model folder's description (``model.json``), readable without torch or timm.

The control plane reads model folders (a teacher's classes, a student's metrics) and must not pay for torch;
``trainer.models`` builds, saves and loads the weights.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service import storage

WEIGHTS = "model.safetensors"
META = "model.json"


class ModelMeta(BaseModel):
    architecture: str = Field(description="timm model name")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")
    class_names: list[str]
    input_size: int = Field(description="square input side in pixels")
    crop_pct: float = 1.0
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    parameters: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict, description="the training config that made it")
    code_version: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_meta(uri: str) -> ModelMeta:
    try:
        return ModelMeta.model_validate_json(storage.read_bytes(storage.join(uri, META)))
    except FileNotFoundError:
        raise ValueError(f"{uri} is not a model folder: no {META}") from None
