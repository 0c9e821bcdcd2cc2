"""Configs of the student's training run: noise and optimisation."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from curation.config import MAX_SEED, CleanStr, Config
from curation.imaging import DecodeConfig
from trainer.meta import ModelShape


class NoiseConfig(Config):
    """The noise of Noisy Student: input noise (RandAugment) and model noise (dropout, stochastic depth)."""

    randaugment_ops: int = Field(2, ge=0, le=16, description="RandAugment ops per image (0 turns it off)")
    randaugment_magnitude: int = Field(
        9,
        ge=0,
        le=30,
        description="RandAugment magnitude: each op at magnitude/10 of its range, as in the official RandAugment "
        "(the paper: 27 for its largest students)",
    )
    randaugment_magnitude_std: float = Field(0.5, ge=0, le=30, description="per-op jitter of the magnitude")
    fill: (
        tuple[
            Annotated[int, Field(ge=0, le=255)],
            Annotated[int, Field(ge=0, le=255)],
            Annotated[int, Field(ge=0, le=255)],
        ]
        | None
    ) = Field(
        None, description="RGB fill of pixels that geometric ops move in from outside the image; default: the mean"
    )
    crop_scale: float = Field(
        1.0,
        gt=0,
        le=1,
        description="random-resized crop: the smallest share of an image's area a crop keeps, at an aspect ratio "
        "of 3/4 to 4/3 (the paper: 0.08, Inception-style); 1: no random crop, the centre crop",
    )
    flip: bool = Field(False, description="random horizontal flip (the paper: on; off for digits or text)")
    erase_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description="random erasing (Cutout): the probability of replacing one rectangle of 2% to 33% of the "
        "image with random pixels (the paper's code: none; timm's recipes: 0.25)",
    )
    dropout: float = Field(0.3, ge=0, lt=1, description="dropout before the classifier")
    drop_path: float = Field(0.2, ge=0, lt=1, description="stochastic depth drop rate at the last block, linear decay")


class TrainConfig(ModelShape):
    """One supervised (teacher) or noisy-student training run: the model to build (``ModelShape``), its
    optimisation and its noise."""

    steps: int = Field(1000, ge=1, le=100_000_000, description="optimizer steps")
    batch_size: int = Field(32, ge=1, le=65_536, description="labeled images per step and worker")
    unlabeled_ratio: float = Field(
        3.0, ge=0, le=1000, description="pseudo-labeled images per labeled image in a batch (the paper: 1 to 28)"
    )
    lr: float = Field(3e-3, gt=0, le=100, description="peak learning rate (AdamW, cosine decay)")
    weight_decay: float = Field(0.05, ge=0, le=100)
    warmup_steps: int = Field(50, ge=0, le=100_000_000)
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA of the weights; the EMA model is evaluated and saved")
    soft_targets: bool = Field(True, description="train on the teacher's soft labels; false: hard labels")
    temperature: float = Field(1.0, gt=0, le=1000, description="sharpens (<1) or flattens (>1) the soft labels")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="smoothing of hard labels")
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    workers: int = Field(1, ge=1, le=1024, description="Ray Train workers (data-parallel)")
    use_gpu: bool | None = Field(None, description="train on GPUs; default: when the cluster has them")
    cpus_per_worker: float = Field(
        0.5,
        gt=0,
        le=1024,
        description="CPUs reserved by each worker on a CPU-only cluster (scheduling only: "
        "torch uses torch_threads); half a CPU leaves room on a one-CPU node for the data tasks",
    )
    max_failures: int = Field(
        3,
        ge=-1,
        le=1000,
        description="failures of the worker group (a lost node, a killed worker) that the run "
        "survives, each time going on from its last checkpoint; -1: any number",
    )
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="intra-op threads per CPU worker; default: all cores"
    )
    init_from: CleanStr | None = Field(
        None,
        max_length=4096,
        description="a model folder whose weights the model starts from (same architecture and classes); "
        "none: random initialisation, as in the paper",
    )
    stall_timeout_s: float | None = Field(
        600.0,
        gt=0,
        le=86_400,
        description="seconds without a training or evaluation step (Ray Train's start-up and restarts included) "
        "after which the run fails with a StallError naming what waits on what; none: wait forever",
    )
    robustness_images: int = Field(
        1000,
        ge=0,
        le=1_000_000_000,
        description="test images the corruption and perturbation suites run on (trainer.robustness); 0: none",
    )
    checkpoint_every: int = Field(200, ge=1, le=100_000_000, description="steps between checkpoints")
    shuffle_buffer: int = Field(2048, ge=0, le=10_000_000, description="rows in each worker's local shuffle buffer")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    deterministic: bool = Field(
        False,
        description="the same seed and data gives the same model (on the same hardware and worker count; the data "
        "at the same URIs, whose ids seed each pass's order): the training streams keep their order, so a slow "
        "decoding task holds back the ones after it. Off: the order in which the data tasks finish, while the "
        "noise and the shuffle buffer stay seeded",
    )
    decode: DecodeConfig = Field(
        default_factory=DecodeConfig,
        description="limits on one image (pixels, aspect ratio) and the background "
        "that transparency is flattened on; an image outside them is skipped and counted in the model's metrics",
    )

    @property
    def unlabeled_batch_size(self) -> int:
        return int(round(self.batch_size * self.unlabeled_ratio))


class FinetuneConfig(Config):
    """The optional last step of a generation: the student fine-tuned on the labeled data alone (the paper's
    option), from its own weights, with the student's architecture, noise and images per step."""

    steps: int = Field(ge=1, le=100_000_000, description="optimizer steps")
    lr: float = Field(3e-4, gt=0, le=100, description="peak learning rate: a tenth of the student's default")
    warmup_steps: int = Field(0, ge=0, le=100_000_000)

    def of(self, student: TrainConfig, init_from: str) -> TrainConfig:
        """The fine-tune's run: the student's config on labeled images only, as many per step as the student
        saw (labeled and pseudo-labeled), starting from the student's model folder ``init_from``."""
        return student.model_copy(
            update={
                "steps": self.steps,
                "lr": self.lr,
                "warmup_steps": self.warmup_steps,
                "batch_size": student.batch_size + student.unlabeled_batch_size,
                "unlabeled_ratio": 0.0,
                "init_from": init_from,
                "checkpoint_every": min(student.checkpoint_every, self.steps),
            }
        )
