"""The control plane's operations: what the API routes call. No HTTP here; errors are service/errors.py's."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
import sqlalchemy as sa

from curation import sources
from service import storage
from service.errors import Conflict, InvalidRequest, NotFound
from service.jobs import Jobs
from service.orchestrator import Orchestrator
from service.settings import Settings
from service.specs import GenerationConfig
from service.states import Stage, check_transition
from service.store import Dataset, Generation, StaleWrite, Store, utcnow
from trainer.meta import ModelMeta, load_meta

GENERATION_ID = r"^g-[0-9a-f]{16}$"
DATASET_ID = r"^d-[0-9a-f]{16}$"
MANIFEST_COLUMNS = ["image_id", "uri", "label", "confidence", "copies"]


def new_generation_id() -> str:
    return "g-" + uuid.uuid4().hex[:16]


@dataclass
class Tokens:
    read: set[str] = field(default_factory=set)
    write: set[str] = field(default_factory=set)

    def role(self, token: str) -> str | None:
        """``write``, ``read`` or None; compares in constant time."""
        for role, tokens in (("write", self.write), ("read", self.read)):
            if any(secrets.compare_digest(token.encode(), known.encode()) for known in tokens):
                return role
        return None


def api_tokens(settings: Settings) -> tuple[Tokens, Path | None]:
    """The configured tokens; in development with none configured, one write token kept in the data dir."""
    tokens = Tokens({t.get_secret_value() for t in settings.read_tokens},
                    {t.get_secret_value() for t in settings.write_tokens})
    if tokens.write or tokens.read:
        return tokens, None
    path = settings.data_dir.resolve() / "api-token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    tokens.write.add(path.read_text().strip())
    return tokens, path


class ControlPlane:
    def __init__(self, settings: Settings, store: Store, jobs: Jobs, tokens: Tokens):
        self.settings, self.store, self.jobs, self.tokens = settings, store, jobs, tokens
        self.orchestrator = Orchestrator(
            store, jobs, poll_seconds=settings.poll_seconds, max_running_jobs=settings.max_running_jobs,
            job_attempts=settings.job_attempts, retry_backoff_seconds=settings.retry_backoff_seconds,
        )
        self.on_stop: list[Callable[[], object]] = []  # run after the orchestrator stops

    def start(self) -> None:
        self.store.migrate()
        self.orchestrator.start()

    def stop(self) -> None:
        self.orchestrator.stop()
        self.store.close()
        for hook in self.on_stop:
            hook()

    # generations

    def create(self, config: GenerationConfig, iterations: int, idempotency_key: str | None) -> list[Generation]:
        """Validate a request and queue its chain of generations; a repeated idempotency key returns the first."""
        body = config.model_dump(mode="json", exclude={"iterations"})
        request_hash = hashlib.sha256(json.dumps([body, iterations], sort_keys=True).encode()).hexdigest()
        if idempotency_key:
            if (existing := self._replay(idempotency_key, request_hash)) is not None:
                return existing
        teacher, parent_id = self._check(config)
        ids = [new_generation_id() for _ in range(iterations)]
        chain = [
            Generation(
                id=gid,
                chain_id=ids[0],
                chain_index=i,
                parent_id=parent_id if i == 0 else ids[i - 1],
                idempotency_key=idempotency_key if i == 0 else None,
                request_hash=request_hash,
                spec={**body, "teacher": teacher if i == 0 else None},
                output=storage.join(self.settings.storage, "generations", gid),
                stage=Stage.QUEUED.value, cancel_requested=False, jobs={}, attempts=0, retries=0, progress={},
                timings={}, metrics={}, version=0,
            )
            for i, gid in enumerate(ids)
        ]
        try:
            self.store.add_chain(chain)
        except sa.exc.IntegrityError:  # the same key, posted twice at once: the other request won
            if idempotency_key and (existing := self._replay(idempotency_key, request_hash)) is not None:
                return existing
            raise
        self.orchestrator.wake()
        return chain

    def _replay(self, key: str, request_hash: str) -> list[Generation] | None:
        first = self.store.by_idempotency_key(key)
        if first is None:
            return None
        if first.request_hash != request_hash:
            raise Conflict(f"Idempotency-Key {key!r} was already used with a different request")
        return self.store.chain(first.chain_id)

    def _check(self, config: GenerationConfig) -> tuple[str | None, str | None]:
        """Every source readable, inside the allowed roots, and non-empty; returns (teacher URI, parent id):
        a teacher given as a generation id is its parent, whose model URI is known once it succeeded."""
        labeled = self.source("labeled", config.labeled)
        self.source("unlabeled", config.unlabeled)
        eval_ = self.source("eval", config.eval)
        teacher, parent_id, class_names = None, None, None
        if config.teacher is not None:
            if config.teacher.startswith("g-"):
                parent = self.store.get(config.teacher)
                if parent is None:
                    raise InvalidRequest("teacher", f"no generation {config.teacher}")
                if parent.stage in ("failed", "cancelled"):
                    raise InvalidRequest("teacher", f"generation {config.teacher} {parent.stage}: it has no model")
                parent_id = parent.id  # its model teaches, once it has one
                teacher = parent.model_uri
            else:
                teacher = self.source("teacher", config.teacher)
            if teacher is not None:
                try:
                    class_names = load_meta(teacher).class_names
                except ValueError as e:
                    raise InvalidRequest("teacher", str(e)) from None
        try:
            _, class_names = sources.labeled_source(labeled, class_names)
        except (ValueError, OSError) as e:
            raise InvalidRequest("labeled", str(e)) from None
        try:
            sources.labeled_source(eval_, class_names)
        except (ValueError, OSError) as e:
            raise InvalidRequest("eval", str(e)) from None
        return teacher, parent_id

    def source(self, name: str, uri: str) -> str:
        """``uri`` normalised, if it lies under an allowed root and exists; else InvalidRequest naming ``name``."""
        if storage.is_remote(uri):
            scheme, rest = uri.split("://", 1)
            if scheme != "s3":
                raise InvalidRequest(name, f"unsupported scheme {scheme!r}: use a path or s3://")
            normalized = "s3://" + posixpath.normpath(rest)
        else:
            normalized = os.path.realpath(uri.removeprefix("file://"))
        if not any(normalized == root or normalized.startswith(root.rstrip("/") + "/")
                   for root in self.settings.allowed_roots):
            raise InvalidRequest(name, f"{uri} is not under an allowed source root")
        try:
            found = storage.exists(normalized)
        except OSError as e:
            raise InvalidRequest(name, f"{uri} cannot be reached: {e}") from None
        if not found:
            raise InvalidRequest(name, f"{uri} does not exist")
        return normalized

    def get(self, generation_id: str) -> Generation:
        g = self.store.get(generation_id)
        if g is None:
            raise NotFound(f"no generation {generation_id}")
        return g

    def page(self, offset: int, limit: int, stage: str | None) -> tuple[list[Generation], int]:
        return self.store.page(offset=offset, limit=min(limit, self.settings.max_page_size), stage=stage)

    def cancel(self, generation_id: str) -> Generation:
        """Ask the orchestrator to stop the generation's job; the generations chained after it are cancelled too."""
        for _ in range(10):
            g = self.get(generation_id)
            if g.state.finished:
                raise Conflict(f"generation {generation_id} already {g.stage}")
            try:
                g = self.store.update(g, cancel_requested=True)
                break
            except StaleWrite:
                continue
        else:
            raise Conflict(f"generation {generation_id} is changing; try again")
        self.orchestrator.wake()
        return g

    def retry(self, generation_id: str) -> Generation:
        """Run a failed or cancelled generation again in its own output folder, from what its jobs left there
        (labeled shards, a curated manifest, training checkpoints); the failed or cancelled generations
        chained after it go again too. Asked again while that retry runs, it changes nothing."""
        for _ in range(10):
            g = self.get(generation_id)
            if not g.state.finished and g.retries > 0:
                return g  # the retry asked for before is running
            if g.state not in (Stage.FAILED, Stage.CANCELLED):
                raise Conflict(f"generation {generation_id} is {g.stage}: only a failed or cancelled one can be retried")
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
        self.orchestrator.wake()
        return g

    def _requeue(self, g: Generation) -> Generation:
        check_transition(g.state, Stage.QUEUED)
        timings = {**g.timings, Stage.QUEUED.value: {"started": utcnow().isoformat()}}
        return self.store.update(g, stage=Stage.QUEUED.value, error=None, finished_at=None, cancel_requested=False,
                                 retries=g.retries + 1, progress={}, timings=timings)

    # datasets and models

    def dataset(self, dataset_id: str) -> Dataset:
        d = self.store.dataset(dataset_id)
        if d is None:
            raise NotFound(f"no dataset {dataset_id}")
        return d

    def manifest(self, dataset_id: str, offset: int, limit: int) -> list[dict[str, Any]]:
        """Rows ``offset..offset+limit`` of a dataset's manifest, in file order; reads only the row groups needed."""
        d = self.dataset(dataset_id)
        limit = min(limit, self.settings.max_page_size)
        rows: list[dict[str, Any]] = []
        for uri in storage.list_files(d.manifest_uri, suffix=".parquet"):
            fs, path = storage.resolve(uri)
            with fs.open_input_file(path) as f:
                file = pq.ParquetFile(f)
                for group in range(file.metadata.num_row_groups):  # footers first: skip without reading
                    if len(rows) >= limit:
                        return rows
                    n = file.metadata.row_group(group).num_rows
                    if offset >= n:
                        offset -= n
                        continue
                    table = file.read_row_group(group, columns=MANIFEST_COLUMNS)
                    rows.extend(table.slice(offset, limit - len(rows)).to_pylist())
                    offset = 0
        return rows

    def model(self, generation_id: str) -> tuple[Generation, ModelMeta]:
        g = self.get(generation_id)
        if g.model_uri is None:
            raise NotFound(f"generation {generation_id} has no model yet (stage {g.stage})")
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
            problems["ray"] = str(e).splitlines()[0][:200]
        return problems
