"""A model folder's description (``model.json``), readable without torch or timm.

The control plane reads model folders (a teacher's classes, a student's metrics) and must not pay for torch;
``trainer.models`` builds, saves and loads the weights.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import Field, field_validator

from curation import storage
from curation.config import Config
from trainer import architectures

# timm.create_model arguments a request or a model.json may set: shapes and regularisation, never a path,
# a download or weights from elsewhere (pretrained, checkpoint_path, pretrained_cfg, cache_dir, ...).
MODEL_KWARGS = frozenset(
    {
        "global_pool",
        "drop_block_rate",
        "pos_drop_rate",
        "proj_drop_rate",
        "attn_drop_rate",
        "patch_drop_rate",
        "img_size",
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "qkv_bias",
        "class_token",
        "no_embed_class",
        "reg_tokens",
        "init_values",
        "channel_multiplier",
        "depth_multiplier",
        "width_multiplier",
        "output_stride",
        "stem_type",
        "layers",
        "channels",
        "width",
        "act_layer",
        "norm_layer",
        "se_layer",
        "bn_eps",
        "bn_momentum",
        "zero_init_last",
    }
)
# Scalars only, and short strings (names of layers or pooling): nothing that could be a path.
_MAX_KWARG_TEXT = 32


def check_model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` if every key is allowed and every value a finite number, a bool, a short name or a short list
    of numbers; else ValueError naming the first that is not."""
    for key, value in kwargs.items():
        if key not in MODEL_KWARGS:
            raise ValueError(f"model_kwargs: {key!r} is not allowed; allowed: {sorted(MODEL_KWARGS)}")
        values = value if isinstance(value, list) and len(value) <= 64 else [value]
        for v in values:
            ok = (
                isinstance(v, bool)
                or (isinstance(v, int) and abs(v) < 2**31)
                or (isinstance(v, float) and math.isfinite(v))
                or (isinstance(v, str) and len(v) <= _MAX_KWARG_TEXT and v.replace("_", "").isalnum())
            )
            if not ok:
                raise ValueError(
                    f"model_kwargs: {key!r} must be a number, a bool, a short name or a short list of numbers"
                )
    return kwargs


WEIGHTS = "model.safetensors"
META = "model.json"


Unit = Annotated[float, Field(ge=0, le=1)]
Spread = Annotated[float, Field(gt=0, le=10)]


class ModelShape(Config):
    """What builds a model and what it takes in: a training config's choice, and a model folder's record of it."""

    architecture: str = Field("resnet18", description="timm model name, built with pretrained=False")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra timm.create_model arguments, from an allow-list (MODEL_KWARGS)"
    )
    input_size: int = Field(224, ge=8, le=1024, description="square input side in pixels")
    crop_pct: float = Field(1.0, gt=0, le=1, description="resize to size/crop_pct, then centre-crop")
    mean: tuple[Unit, Unit, Unit] = Field((0.485, 0.456, 0.406), description="per-channel mean of [0, 1] pixels")
    std: tuple[Spread, Spread, Spread] = Field((0.229, 0.224, 0.225), description="per-channel standard deviation")

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, name: str) -> str:
        return architectures.check(name)

    @field_validator("model_kwargs")
    @classmethod
    def _allowed_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        return check_model_kwargs(kwargs)


class ModelMeta(ModelShape):
    """``model.json``: the model's shape, its classes, how well it did and what made it."""

    class_names: list[str]
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
