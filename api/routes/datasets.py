"""Datasets: the curation statistics of a generation and its manifest (kept image ids and labels)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response

from api.deps import ControlDep, Reader
from api.schemas import DatasetPublic, ManifestPage, ManifestQuery, ManifestRow, Problem
from service.control import DATASET_ID

router = APIRouter(prefix="/datasets", tags=["datasets"])
DatasetId = Annotated[str, Path(pattern=DATASET_ID, description="d- and 16 hex digits")]
RESPONSES: dict[int | str, dict[str, Any]] = {401: {"model": Problem}, 404: {"model": Problem}}


@router.get("/{dataset_id}", responses=RESPONSES)
def get_dataset(dataset_id: DatasetId, control: ControlDep, caller: Reader) -> DatasetPublic:
    """Curation statistics: per class before and after, thresholds, histogram, rejects, manifest and config."""
    d = control.dataset(dataset_id, caller)
    return DatasetPublic.model_validate(
        {
            **d.stats,
            "generation_id": d.generation_id,
            "created_at": d.created_at,
            "links": {
                "self": f"/datasets/{d.id}",
                "manifest": f"/datasets/{d.id}/manifest",
                "generation": f"/generations/{d.generation_id}",
            },
        }
    )


@router.get("/{dataset_id}/manifest", responses=RESPONSES)
def get_manifest(
    dataset_id: DatasetId, control: ControlDep, caller: Reader, query: Annotated[ManifestQuery, Query()]
) -> ManifestPage:
    """The kept images, a page at a time: image_id, uri, label, confidence, copies. For bulk reads, take the
    Parquet files at the dataset's `manifest_uri` directly."""
    limit = min(query.limit, control.settings.max_page_size)
    rows = control.manifest(dataset_id, query.offset, limit, caller)
    return ManifestPage(
        data=[ManifestRow.model_validate(r) for r in rows],
        count=control.dataset(dataset_id, caller).rows,
        offset=query.offset,
        limit=limit,
    )


ImageId = Annotated[int, Path(ge=-(2**63), le=2**63 - 1, description="a manifest row's image_id")]


@router.get("/{dataset_id}/samples", responses=RESPONSES)
def get_samples(
    dataset_id: DatasetId, control: ControlDep, caller: Reader, per_class: Annotated[int, Query(ge=1, le=32)] = 8
) -> dict[int, list[ManifestRow]]:
    """A few kept images of each class (by class index), most confident first: the dashboard's sample grid."""
    return {
        c: [ManifestRow.model_validate(r) for r in rows]
        for c, rows in control.samples(dataset_id, per_class, caller).items()
    }


@router.get(
    "/{dataset_id}/images/{image_id}/thumbnail",
    response_class=Response,
    responses={**RESPONSES, 200: {"content": {"image/png": {}}, "description": "PNG, at most 96 px a side"}},
)
def get_thumbnail(dataset_id: DatasetId, image_id: ImageId, control: ControlDep, caller: Reader) -> Response:
    """A thumbnail of an image that the dataset's manifest names (no other image can be read here)."""
    return Response(
        control.thumbnail(dataset_id, image_id, caller),
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=3600"},
    )
