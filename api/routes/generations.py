"""Generations: start (a chain of) Noisy Student iterations, follow them, cancel them, get their models."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from api.deps import ControlDep, Reader, Writer
from api.schemas import (
    GenerationAccepted,
    GenerationCreate,
    GenerationPublic,
    GenerationQuery,
    GenerationsPublic,
    ModelPublic,
    Problem,
    StageTiming,
)
from curation.layout import Progress
from service.control import GENERATION_ID
from service.errors import NotFound
from service.store import Generation

router = APIRouter(prefix="/generations", tags=["generations"])
GenerationId = Annotated[str, Path(pattern=GENERATION_ID, description="g- and 16 hex digits")]
AUTH: dict[int | str, dict[str, Any]] = {401: {"model": Problem}, 403: {"model": Problem}}


def public(g: Generation) -> GenerationPublic:
    timings = {}
    for stage, t in g.timings.items():
        timing = StageTiming.model_validate(t)
        if timing.finished:
            timing.seconds = (timing.finished - timing.started).total_seconds()
        timings[stage] = timing
    links = {
        "self": f"/generations/{g.id}",
        "cancel": f"/generations/{g.id}/cancel",
        "retry": f"/generations/{g.id}/retry",
    }
    if g.dataset_id:
        links["dataset"] = f"/datasets/{g.dataset_id}"
    if g.model_uri:
        links["model"] = f"/generations/{g.id}/model"
    return GenerationPublic(
        id=g.id,
        chain_id=g.chain_id,
        chain_index=g.chain_index,
        parent_id=g.parent_id,
        stage=g.stage,
        cancel_requested=g.cancel_requested,
        created_at=g.created_at,
        updated_at=g.updated_at,
        finished_at=g.finished_at,
        spec=g.spec,
        output=g.output,
        teacher_uri=g.teacher_uri,
        model_uri=g.model_uri,
        dataset_id=g.dataset_id,
        jobs=g.jobs,
        retries=g.retries,
        created_by=g.created_by,
        progress=Progress.model_validate(g.progress),
        timings=timings,
        metrics=g.metrics,
        error=g.error,
        links=links,
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    responses={**AUTH, 400: {"model": Problem}, 409: {"model": Problem}, 422: {"model": Problem}},
)
def create_generation(
    body: GenerationCreate,
    control: ControlDep,
    caller: Writer,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255, description="repeat-safe submission key")] = None,
) -> GenerationAccepted:
    """Start a generation (or `iterations` chained ones); the sources are checked before anything runs."""
    chain = control.create(body, body.iterations, idempotency_key, caller, students=body.students)
    first = chain[0]
    response.headers["Location"] = f"/generations/{first.id}"
    return GenerationAccepted(
        id=first.id,
        chain=[g.id for g in chain],
        links={"self": f"/generations/{first.id}", "cancel": f"/generations/{first.id}/cancel"},
    )


@router.get("", responses=AUTH)
def list_generations(
    control: ControlDep, caller: Reader, query: Annotated[GenerationQuery, Query()]
) -> GenerationsPublic:
    """Generations, newest first (the caller's own, unless it may see every principal's)."""
    rows, count = control.page(query.offset, query.limit, query.stage, caller)
    return GenerationsPublic(data=[public(g) for g in rows], count=count)


class ResponseCache:
    """Serialized generations, with their owner, for up to ``ttl`` seconds: clients poll this endpoint, and most
    polls find nothing changed. A change made by this process drops the entry at once; one made by another replica
    shows within ``ttl``."""

    def __init__(self, ttl: float = 1.0):
        self.ttl = ttl
        self.entries: dict[str, tuple[float, tuple[str, bytes]]] = {}

    def get(self, key: str) -> tuple[str, bytes] | None:
        entry = self.entries.get(key)
        return entry[1] if entry and entry[0] > time.monotonic() else None

    def put(self, key: str, body: tuple[str, bytes]) -> None:
        if len(self.entries) > 10_000:
            self.entries.clear()
        self.entries[key] = (time.monotonic() + self.ttl, body)

    def invalidate(self, key: str) -> None:
        self.entries.pop(key, None)


@router.get("/{generation_id}", response_model=GenerationPublic, responses={**AUTH, 404: {"model": Problem}})
async def get_generation(
    generation_id: GenerationId, control: ControlDep, caller: Reader, request: Request
) -> Response:
    """A generation: stage, progress, Ray jobs and their attempts, timings, metrics, dataset and model, or its
    error."""
    cache: ResponseCache = request.app.state.generation_cache
    entry = cache.get(generation_id)
    if entry is None:
        g = await run_in_threadpool(lambda: control.get(generation_id, caller))
        entry = (g.created_by, public(g).model_dump_json().encode())
        cache.put(generation_id, entry)
    owner, body = entry
    if not caller.may_see(owner):
        raise NotFound(f"no generation {generation_id}")
    return Response(body, media_type="application/json")


@router.post(
    "/{generation_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    responses={**AUTH, 404: {"model": Problem}, 409: {"model": Problem}},
)
def cancel_generation(generation_id: GenerationId, control: ControlDep, caller: Writer) -> GenerationPublic:
    """Stop a generation's Ray job; generations chained after it are cancelled as well."""
    return public(control.cancel(generation_id, caller))


@router.post(
    "/{generation_id}/retry",
    status_code=status.HTTP_202_ACCEPTED,
    responses={**AUTH, 404: {"model": Problem}, 409: {"model": Problem}},
)
def retry_generation(generation_id: GenerationId, control: ControlDep, caller: Writer) -> GenerationPublic:
    """Run a failed or cancelled generation again from its stored artifacts, with the failed or cancelled
    generations chained after it; asked again while that retry runs, it changes nothing."""
    return public(control.retry(generation_id, caller))


@router.get("/{generation_id}/model", responses={**AUTH, 404: {"model": Problem}})
def get_model(generation_id: GenerationId, control: ControlDep, caller: Reader) -> ModelPublic:
    """The model a generation produced, with its evaluation metrics; its URI can be the next teacher."""
    g, meta = control.model(generation_id, caller)
    return ModelPublic(
        generation_id=g.id,
        uri=g.model_uri,
        architecture=meta.architecture,
        class_names=meta.class_names,
        input_size=meta.input_size,
        parameters=meta.parameters,
        metrics=meta.metrics,
        code_version=meta.code_version,
    )
