"""Dataset statistics: what curation saw, kept and wrote, with the config that did it."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, Field

from curation.balance import CurationConfig


class ClassStats(BaseModel):
    class_index: int
    class_name: str
    predicted: int = Field(description="images the teacher put in this class, before filtering")
    above_floor: int = Field(description="of those, at or above the confidence floor")
    threshold: float = Field(description="confidence threshold used for this class")
    eligible: int = Field(description="images at or above the threshold (N)")
    kept: int = Field(description="distinct images in the manifest")
    copies: int = Field(description="rows the student will see: kept images times their copies")
    confidence_histogram: list[int] = Field(
        default_factory=list,
        description="this class's top-1 confidences: 101 bins, 0.01 wide from 0.00, the last "
        "for 1.00 alone (100 bins in older stats, none in the oldest)",
    )


class DatasetStats(BaseModel):
    dataset_id: str
    images_seen: int = Field(description="rows in the unlabeled source")
    images_decoded: int
    rejected: dict[str, int] = Field(description="images that could not be read or decoded, by reason")
    images_per_class: int = Field(description="K, the balancing target")
    classes: list[ClassStats]
    confidence_histogram: list[int] = Field(
        description="top-1 confidence of all predictions, in the same bins as a class's"
    )
    config: CurationConfig
    config_hash: str
    manifest_uri: str
    manifest_rows: int
    manifest_copies: int
    manifest_checksum: str = Field(description="order-independent digest of (image_id, label, copies) over all rows")
    predictions_uri: str
    teacher: str = ""


def config_hash(config: CurationConfig, **inputs: str) -> str:
    payload = json.dumps({"config": config.model_dump(), **inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
