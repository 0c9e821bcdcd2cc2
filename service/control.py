"""The control plane's operations: what the API routes call. No HTTP here; errors are service/errors.py's."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from curation import access, imaging, shards, sources, storage
from service.errors import Conflict, InvalidRequest, NotFound
from service.failures import LOG_LINE, one_line
from service.jobs import Jobs
from service.orchestrator import Orchestrator
from service.principals import Principal, Principals
from service.redact import redact
from service.settings import Settings
from service.specs import GenerationConfig
from service.states import Stage, check_transition
from service.store import DatabaseUnavailable, Dataset, Generation, StaleWrite, Store, utcnow
from trainer.config import TrainConfig
from trainer.meta import ModelMeta, load_meta

GENERATION_ID = r"^g-[0-9a-f]{16}$"
DATASET_ID = r"^d-[0-9a-f]{16}$"
MANIFEST_COLUMNS = ["image_id", "uri", "label", "confidence", "copies"]
# The dashboard's sample grid: rows read at most to find samples of every class, and the thumbnails' size.
SAMPLE_SCAN_ROWS = 200_000
THUMBNAIL_PIXELS = 96
# Labeled and eval manifests up to this many rows have their classes checked in the request; the first job
# checks larger ones (reading millions of rows would hold the request for seconds).
QUICK_CHECK_ROWS = 10_000

log = logging.getLogger(__name__)


def _row_groups(manifest_uri: str) -> Iterator[tuple[int, Callable[[], pa.Table]]]:
    """Each row group of a manifest's files, in file order: its rows (from the footer, nothing read) and a
    reader of its ``MANIFEST_COLUMNS``. A caller that stops early has read only the groups it asked for."""
    for uri in storage.list_files(manifest_uri, suffix=".parquet"):
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            file = pq.ParquetFile(f)
            for group in range(file.metadata.num_row_groups):
                yield (
                    file.metadata.row_group(group).num_rows,
                    functools.partial(file.read_row_group, group, columns=MANIFEST_COLUMNS),
                )


def new_generation_id() -> str:
    return "g-" + uuid.uuid4().hex[:16]


class ControlPlane:
    def __init__(self, settings: Settings, store: Store, jobs: Jobs, principals: Principals):
        self.settings, self.store, self.jobs, self.principals = settings, store, jobs, principals
        self.orchestrator = Orchestrator(
            store,
            jobs,
            poll_seconds=settings.poll_seconds,
            max_running_jobs=settings.max_running_jobs,
            job_attempts=settings.job_attempts,
            retry_backoff_seconds=settings.retry_backoff_seconds,
        )
        self.on_stop: list[Callable[[], object]] = []  # run after the orchestrator stops

    def start(self) -> None:
        self._wait_for_database()
        self.store.migrate()
        self.orchestrator.start()

    def _wait_for_database(self) -> None:
        """Ask the database until it answers, for up to ``settings.database_wait_seconds``: at start-up it may not
        be up yet (a database or a proxy that starts beside the server). Then DatabaseUnavailable."""
        deadline, delay = time.monotonic() + self.settings.database_wait_seconds, 0.5
        while True:
            try:
                self.store.ping()
                return
            except DatabaseUnavailable as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                log.warning("waiting for the database: %s", one_line(e, LOG_LINE))
                time.sleep(min(delay, left))
                delay = min(2 * delay, 5.0)

    def stop(self) -> None:
        self.orchestrator.stop()
        self.store.close()
        for hook in self.on_stop:
            hook()

    # generations

    def roots(self, principal: Principal) -> list[str]:
        """Where ``principal``'s generations may read from: the global roots and its own."""
        return [*self.settings.allowed_roots, *principal.roots]

    def create(
        self,
        config: GenerationConfig,
        iterations: int,
        idempotency_key: str | None,
        principal: Principal,
        students: list[TrainConfig] | None = None,
    ) -> list[Generation]:
        """Validate a request and queue its chain of generations, generation i with ``students[i]`` as its
        student when given; a repeated idempotency key (per principal) returns the first. The spec stores the
        sources normalised, and the roots its jobs check every read against."""
        body = config.model_dump(mode="json", exclude={"iterations", "students"})
        per_generation = [s.model_dump(mode="json") for s in students] if students else None
        request = [body, iterations] + ([per_generation] if per_generation else [])
        request_hash = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        if idempotency_key:
            if (existing := self._replay(idempotency_key, request_hash, principal)) is not None:
                return existing
        roots = self.roots(principal)
        normalized = {
            name: self.source(name, getattr(config, name), roots)
            for name in ("labeled", "unlabeled", "eval", "validation")
            if getattr(config, name) is not None
        }
        teacher, parent_id = self._check(config, normalized, roots, principal)
        for train in [config.student, config.teacher_config, *(students or [])]:
            if train is not None and train.init_from:  # the job checks it again, against the spec's roots
                self.source("init_from", train.init_from, roots)
        if config.robustness_baseline is not None:
            baseline = self.source("robustness_baseline", config.robustness_baseline, roots)
            try:
                load_meta(baseline)
            except ValueError as e:
                raise InvalidRequest("robustness_baseline", str(e)) from None
            normalized["robustness_baseline"] = baseline
        body = {**body, **normalized, "roots": roots, "progress_seconds": self.settings.progress_seconds}
        ids = [new_generation_id() for _ in range(iterations)]
        chain = [
            Generation(
                id=gid,
                chain_id=ids[0],
                chain_index=i,
                parent_id=parent_id if i == 0 else ids[i - 1],
                idempotency_key=idempotency_key if i == 0 else None,
                request_hash=request_hash,
                spec={
                    **body,
                    "teacher": teacher if i == 0 else None,
                    **({"student": per_generation[i]} if per_generation else {}),
                },
                output=storage.join(self.settings.storage, "generations", gid),
                stage=Stage.QUEUED.value,
                cancel_requested=False,
                jobs={},
                attempts=0,
                retries=0,
                progress={},
                timings={},
                metrics={},
                version=0,
                created_by=principal.name,
            )
            for i, gid in enumerate(ids)
        ]
        try:
            self.store.add_chain(chain, audit=(principal.name, "create", ids[0], {"chain": ids}))
        except sa.exc.IntegrityError:  # the same key, posted twice at once: the other request won
            if idempotency_key and (existing := self._replay(idempotency_key, request_hash, principal)) is not None:
                return existing
            raise
        self.orchestrator.wake()
        return chain

    def _replay(self, key: str, request_hash: str, principal: Principal) -> list[Generation] | None:
        first = self.store.by_idempotency_key(key, principal.name)
        if first is None:
            return None
        if first.request_hash != request_hash:
            raise Conflict(f"Idempotency-Key {key!r} was already used with a different request")
        return self.store.chain(first.chain_id)

    def _check(
        self, config: GenerationConfig, normalized: dict[str, str], roots: list[str], principal: Principal
    ) -> tuple[str | None, str | None]:
        """The teacher readable, and the labeled and eval sets of its classes; returns (teacher URI, parent id):
        a teacher given as a generation id is its parent, whose model URI is known once it succeeded."""
        labeled, eval_ = normalized["labeled"], normalized["eval"]
        teacher, parent_id, class_names = None, None, None
        if config.teacher is not None:
            if config.teacher.startswith("g-"):
                parent = self.store.get(config.teacher)
                if parent is None or not principal.may_see(parent.created_by):
                    raise InvalidRequest("teacher", f"no generation {config.teacher}")
                if parent.stage in ("failed", "cancelled"):
                    raise InvalidRequest("teacher", f"generation {config.teacher} {parent.stage}: it has no model")
                parent_id = parent.id  # its model teaches, once it has one
                teacher = parent.model_uri
            else:
                teacher = self.source("teacher", config.teacher, roots)
            if teacher is not None:
                try:
                    class_names = load_meta(teacher).class_names
                except ValueError as e:
                    raise InvalidRequest("teacher", str(e)) from None
        checked = [("labeled", labeled, config.labeled_format), ("eval", eval_, config.eval_format)]
        if "validation" in normalized:
            checked.append(("validation", normalized["validation"], config.validation_format))
        for name, uri, fmt in checked:
            if uri.endswith(".parquet") and (storage.parquet_rows(uri) or 0) > QUICK_CHECK_ROWS:
                continue  # the first job reads it and names the bad rows
            try:
                _, names = sources.labeled_source(uri, class_names, fmt)
            except (ValueError, OSError) as e:
                raise InvalidRequest(name, str(e)) from None
            class_names = class_names or names
        return teacher, parent_id

    def source(self, name: str, uri: str, roots: list[str]) -> str:
        """``uri`` normalised, if it lies under one of ``roots`` and exists; else InvalidRequest naming ``name``."""
        try:
            normalized = access.normalize(uri)
        except access.BadUri as e:
            raise InvalidRequest(name, str(e)) from None
        if not access.under(normalized, roots):
            raise InvalidRequest(name, f"{uri} is not under an allowed source root")
        try:
            found = storage.exists(normalized)
        except OSError as e:
            raise InvalidRequest(name, f"{uri} cannot be reached: {e}") from None
        if not found:
            raise InvalidRequest(name, f"{uri} does not exist")
        return normalized

    def get(self, generation_id: str, principal: Principal) -> Generation:
        """The generation, if ``principal`` may see it; another principal's is not found, as a missing one."""
        g = self.store.get(generation_id)
        if g is None or not principal.may_see(g.created_by):
            raise NotFound(f"no generation {generation_id}")
        return g

    def page(self, offset: int, limit: int, stage: str | None, principal: Principal) -> tuple[list[Generation], int]:
        return self.store.page(
            offset=offset,
            limit=min(limit, self.settings.max_page_size),
            stage=stage,
            created_by=None if principal.sees_all else principal.name,
        )

    def cancel(self, generation_id: str, principal: Principal) -> Generation:
        """Ask the orchestrator to stop the generation's job; the generations chained after it are cancelled too."""
        for _ in range(10):
            g = self.get(generation_id, principal)
            if g.state.finished:
                raise Conflict(f"generation {generation_id} already {g.stage}")
            try:
                g = self.store.update(g, cancel_requested=True)
                break
            except StaleWrite:
                continue
        else:
            raise Conflict(f"generation {generation_id} is changing; try again")
        self.store.audit(principal.name, "cancel", generation_id)
        self.orchestrator.wake()
        return g

    def retry(self, generation_id: str, principal: Principal) -> Generation:
        """Run a failed or cancelled generation again in its own output folder, from what its jobs left there
        (labeled shards, a curated manifest, training checkpoints); the failed or cancelled generations
        chained after it go again too. Asked again while that retry runs, it changes nothing."""
        for _ in range(10):
            g = self.get(generation_id, principal)
            if not g.state.finished and g.retries > 0:
                return g  # the retry asked for before is running
            if g.state not in (Stage.FAILED, Stage.CANCELLED):
                raise Conflict(
                    f"generation {generation_id} is {g.stage}: only a failed or cancelled one can be retried"
                )
            try:
                g = self._requeue(g)
                break
            except StaleWrite:
                continue
        else:
            raise Conflict(f"generation {generation_id} is changing; try again")
        for later in self.store.later_in_chain(g):
            if later.state in (Stage.FAILED, Stage.CANCELLED):
                try:
                    self._requeue(later)
                except StaleWrite:  # moved meanwhile: it is no longer failed
                    pass
        self.store.audit(principal.name, "retry", generation_id, {"retries": g.retries})
        self.orchestrator.wake()
        return g

    def _requeue(self, g: Generation) -> Generation:
        check_transition(g.state, Stage.QUEUED)
        timings = {**g.timings, Stage.QUEUED.value: {"started": utcnow().isoformat()}}
        return self.store.update(
            g,
            stage=Stage.QUEUED.value,
            error=None,
            finished_at=None,
            cancel_requested=False,
            retries=g.retries + 1,
            progress={},
            timings=timings,
        )

    # datasets and models

    def dataset(self, dataset_id: str, principal: Principal) -> Dataset:
        d = self.store.dataset(dataset_id)
        if d is None or not principal.may_see(self.store.owner(d.generation_id)):
            raise NotFound(f"no dataset {dataset_id}")
        return d

    def manifest(self, dataset_id: str, offset: int, limit: int, principal: Principal) -> list[dict[str, Any]]:
        """Rows ``offset..offset+limit`` of a dataset's manifest, in file order; reads only the row groups needed."""
        d = self.dataset(dataset_id, principal)
        limit = min(limit, self.settings.max_page_size)
        rows: list[dict[str, Any]] = []
        with storage.store_errors(d.manifest_uri):
            for n, read in _row_groups(d.manifest_uri):  # footers first: a group is skipped without reading it
                if len(rows) >= limit:
                    break
                if offset >= n:
                    offset -= n
                    continue
                rows.extend(read().slice(offset, limit - len(rows)).to_pylist())
                offset = 0
        return rows

    def samples(
        self, dataset_id: str, per_class: int, principal: Principal, max_rows: int = SAMPLE_SCAN_ROWS
    ) -> dict[int, list[dict[str, Any]]]:
        """Up to ``per_class`` kept rows of each class, the first in file order, most confident first; reads row
        groups until every class has its share or ``max_rows`` rows were read (a sample, not a ranking)."""
        d = self.dataset(dataset_id, principal)
        classes = [c["class_index"] for c in d.stats.get("classes", []) if c.get("kept")]
        found: dict[int, list[dict[str, Any]]] = {c: [] for c in classes}
        scanned = 0
        with storage.store_errors(d.manifest_uri):
            for _, read in _row_groups(d.manifest_uri):
                if scanned >= max_rows or all(len(rows) >= per_class for rows in found.values()):
                    break
                table = read()
                scanned += table.num_rows
                for row in table.to_pylist():
                    rows = found.setdefault(row["label"], [])
                    if len(rows) < per_class:
                        rows.append(row)
        return {c: sorted(rows, key=lambda r: -r["confidence"]) for c, rows in sorted(found.items())}

    def thumbnail(self, dataset_id: str, image_id: int, principal: Principal, size: int = THUMBNAIL_PIXELS) -> bytes:
        """A PNG of at most ``size`` pixels a side of an image that the dataset's manifest names. The URI is
        the manifest's, never the caller's, and is checked against the roots its generation's jobs read
        under; the image is decoded under the jobs' limits (header checked before any pixel is decoded)."""
        d = self.dataset(dataset_id, principal)
        uri = None
        with storage.store_errors(d.manifest_uri):
            for file_uri in storage.list_files(d.manifest_uri, suffix=".parquet"):
                fs, path = storage.resolve(file_uri)
                hits = pq.read_table(path, filesystem=fs, columns=["uri"], filters=[("image_id", "=", image_id)])
                if hits.num_rows:
                    uri = hits.column("uri")[0].as_py()
                    break
        if uri is None:
            raise NotFound(f"image {image_id} is not in dataset {dataset_id}")
        g = self.store.get(d.generation_id)
        roots = (g.spec.get("roots") if g is not None else None) or self.settings.allowed_roots
        container, member = shards.split(uri) or (uri, None)
        try:
            container = access.normalize(container)  # what is checked is what is read
            if not access.under(container, roots):
                raise NotFound(f"image {image_id} lies outside the dataset's source roots")
            with storage.store_errors(container):
                if member is None:
                    data = storage.read_bytes(container)
                elif shards.is_tar(container):
                    data = next((b for _, b in shards.read_tar_members(container, [member])), b"")
                else:
                    data = next((b for _, b in shards.read_parquet_rows(container, [int(member)])), b"")
            img = imaging.decode_rgb(data)
        except storage.StorageUnavailable:
            raise  # the store's fault, not the image's: a 503, and the image is asked for again later
        except (OSError, ValueError, MemoryError, imaging.RejectedImage) as e:
            raise NotFound(f"image {image_id} cannot be read: {getattr(e, 'reason', type(e).__name__)}") from None
        img.thumbnail((size, size))
        out = io.BytesIO()
        img.save(out, format="PNG", optimize=True)
        return out.getvalue()

    def model(self, generation_id: str, principal: Principal) -> tuple[Generation, ModelMeta]:
        g = self.get(generation_id, principal)
        if g.model_uri is None:
            raise NotFound(f"generation {generation_id} has no model yet (stage {g.stage})")
        with storage.store_errors(g.model_uri):
            return g, load_meta(g.model_uri)

    def ready(self) -> dict[str, str]:
        """Problems by dependency; empty when the database and Ray are reachable."""
        problems = {}
        try:
            self.store.ping()
        except Exception as e:
            problems["database"] = type(e).__name__
        try:
            self.jobs.ping()
        except Exception as e:
            problems["ray"] = redact(str(e).splitlines()[0])[:200]
        return problems
