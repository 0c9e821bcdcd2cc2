"""Datasets: the curation statistics of a generation and its manifest (kept image ids and labels)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from api.deps import ControlDep, Reader
from api.schemas import DatasetPublic, ManifestPage, ManifestQuery, ManifestRow, Problem
from service.control import DATASET_ID

router = APIRouter(prefix="/datasets", tags=["datasets"], dependencies=[Reader])
DatasetId = Annotated[str, Path(pattern=DATASET_ID, description="d- and 16 hex digits")]
RESPONSES = {401: {"model": Problem}, 404: {"model": Problem}}


@router.get("/{dataset_id}", responses=RESPONSES)
def get_dataset(dataset_id: DatasetId, control: ControlDep) -> DatasetPublic:
    """Curation statistics: per class before and after, thresholds, histogram, rejects, manifest and config."""
    d = control.dataset(dataset_id)
    return DatasetPublic.model_validate(
        {**d.stats, "generation_id": d.generation_id, "created_at": d.created_at,
         "links": {"self": f"/datasets/{d.id}", "manifest": f"/datasets/{d.id}/manifest",
                   "generation": f"/generations/{d.generation_id}"}}
    )


@router.get("/{dataset_id}/manifest", responses=RESPONSES)
def get_manifest(dataset_id: DatasetId, control: ControlDep, query: Annotated[ManifestQuery, Query()]) -> ManifestPage:
    """The kept images, a page at a time: image_id, uri, label, confidence, copies. For bulk reads, take the
    Parquet files at the dataset's `manifest_uri` directly."""
    limit = min(query.limit, control.settings.max_page_size)
    rows = control.manifest(dataset_id, query.offset, limit)
    return ManifestPage(data=[ManifestRow.model_validate(r) for r in rows], count=control.dataset(dataset_id).rows,
                        offset=query.offset, limit=limit)
