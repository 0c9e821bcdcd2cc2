"""Configs of the student's training run: noise and optimisation."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from trainer import architectures


class NoiseConfig(BaseModel):
    """The noise of Noisy Student: input noise (RandAugment) and model noise (dropout, stochastic depth)."""

    randaugment_ops: int = Field(2, ge=0, description="RandAugment ops per image (0 turns it off)")
    randaugment_magnitude: int = Field(9, ge=0, le=30, description="RandAugment magnitude (timm scale, 10 = strong)")
    randaugment_magnitude_std: float = Field(0.5, ge=0, description="per-op jitter of the magnitude")
    fill: tuple[int, int, int] | None = Field(
        None, description="RGB fill of pixels that geometric ops move in from outside the image; default: the mean"
    )
    dropout: float = Field(0.3, ge=0, lt=1, description="dropout before the classifier")
    drop_path: float = Field(0.2, ge=0, lt=1, description="stochastic depth drop rate at the last block, linear decay")


class TrainConfig(BaseModel):
    """One supervised (teacher) or noisy-student training run."""

    architecture: str = Field("resnet18", description="timm model name, built with pretrained=False")
    model_kwargs: dict = Field(default_factory=dict, description="extra timm.create_model arguments")
    input_size: int = Field(224, ge=8, description="square input side in pixels")
    crop_pct: float = Field(1.0, gt=0, le=1, description="resize to size/crop_pct, then centre-crop")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="labeled images per step and worker")
    unlabeled_ratio: float = Field(3.0, ge=0, description="pseudo-labeled images per labeled image in a batch")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (AdamW, cosine decay)")
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(50, ge=0)
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA of the weights; the EMA model is evaluated and saved")
    soft_targets: bool = Field(True, description="train on the teacher's soft labels; false: hard labels")
    temperature: float = Field(1.0, gt=0, description="sharpens (<1) or flattens (>1) the soft labels")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="smoothing of hard labels")
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel)")
    use_gpu: bool | None = Field(None, description="train on GPUs; default: when the cluster has them")
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per CPU worker; default: all cores")
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints")
    shuffle_buffer: int = Field(2048, ge=0, description="rows in each worker's local shuffle buffer")
    seed: int = 0

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, name: str) -> str:
        return architectures.check(name)

    @property
    def unlabeled_batch_size(self) -> int:
        return int(round(self.batch_size * self.unlabeled_ratio))
