"""The state store: generations and datasets in SQLite or PostgreSQL (SQLAlchemy 2, Alembic migrations).

Every change of a generation goes through ``update``, which bumps ``version`` and refuses a write based on a
stale read (optimistic locking), so two control-plane replicas can follow the same generations safely.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Integer, String, Text, create_engine, event, func, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from service.states import TERMINAL, Attempt, JobKind, Stage

JSONType = JSON().with_variant(JSONB(), "postgresql")
MIGRATIONS = Path(__file__).parent / "migrations"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class Generation(Base):
    __tablename__ = "generations"
    __table_args__ = (sa.UniqueConstraint("created_by", "idempotency_key", name="uq_generations_principal_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # A request with `iterations: n` makes a chain of n generations; each waits for its parent's model.
    chain_id: Mapped[str] = mapped_column(String(32), index=True)
    chain_index: Mapped[int] = mapped_column(Integer, default=0)
    parent_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Unique per principal (created_by, idempotency_key): one team's key never answers another's request.
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_by: Mapped[str] = mapped_column(String(64), default="default", index=True, doc="the principal")
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType, doc="GenerationSpec JSON; teacher may be a parent id")
    output: Mapped[str] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(String(32), default=Stage.QUEUED, index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    jobs: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict, doc="job kind -> its attempts (Attempt)")
    attempts: Mapped[int] = mapped_column(Integer, default=0, doc="job attempts submitted, all kinds")
    retries: Mapped[int] = mapped_column(Integer, default=0, doc="retries a user asked for")
    progress: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    timings: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict, doc="stage -> {started, finished}")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    teacher_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    model_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    dataset_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    @property
    def state(self) -> Stage:
        return Stage(self.stage)

    def attempts_of(self, kind: JobKind) -> list[Attempt]:
        return [Attempt.model_validate(a) for a in self.jobs.get(kind, [])]

    def with_attempts(self, kind: JobKind, attempts: list[Attempt]) -> dict[str, Any]:
        """``jobs`` with ``kind``'s attempts replaced: the value to write back."""
        return {**self.jobs, kind.value: [a.model_dump(mode="json") for a in attempts]}


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    generation_id: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    manifest_uri: Mapped[str] = mapped_column(Text)
    rows: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(64))
    stats: Mapped[dict[str, Any]] = mapped_column(JSONType, doc="DatasetStats JSON")


class AuditEntry(Base):
    """One write through the API: who did what, to which generation, when."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    principal: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


class StaleWrite(RuntimeError):
    """Another writer changed the row since it was read."""


# The database could not be reached or could not run a statement for a reason of its own: a restart, a failover,
# a lock held too long (SQLAlchemy's OperationalError). The transaction did not commit; try again later.
DatabaseUnavailable = sa.exc.OperationalError


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):  # readers don't block the writer; waits instead of "database is locked"
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent; run at every start)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Store:
    def __init__(self, url: str):
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Called with a generation's id after each change this process makes to it (cache invalidation).
        self.listeners: list[Callable[[str], None]] = []

    def migrate(self) -> None:
        migrate(self.engine)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()

    # generations

    def add_chain(self, generations: list[Generation], audit: tuple[str, str, str, dict[str, Any]]) -> None:
        """Insert a chain and its audit entry at once; an idempotency key already taken raises
        ``sa.exc.IntegrityError``."""
        principal, action, target, detail = audit
        with self.sessions.begin() as s:
            s.add_all(generations)
            s.add(AuditEntry(principal=principal, action=action, target=target, detail=detail))

    def audit(self, principal: str, action: str, target: str, detail: dict[str, Any] | None = None) -> None:
        with self.sessions.begin() as s:
            s.add(AuditEntry(principal=principal, action=action, target=target, detail=detail or {}))

    def audit_log(self, *, offset: int, limit: int) -> tuple[list[AuditEntry], int]:
        with self.sessions() as s:
            count = s.scalar(select(func.count()).select_from(AuditEntry)) or 0
            rows = s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).offset(offset).limit(limit))
            return list(rows), count

    def owner(self, generation_id: str) -> str | None:
        with self.sessions() as s:
            return s.scalar(select(Generation.created_by).where(Generation.id == generation_id))

    def get(self, generation_id: str) -> Generation | None:
        with self.sessions() as s:
            return s.get(Generation, generation_id)

    def by_idempotency_key(self, key: str, principal: str) -> Generation | None:
        with self.sessions() as s:
            q = select(Generation).where(Generation.idempotency_key == key, Generation.created_by == principal)
            return s.scalars(q).first()

    def chain(self, chain_id: str) -> list[Generation]:
        with self.sessions() as s:
            q = select(Generation).where(Generation.chain_id == chain_id).order_by(Generation.chain_index)
            return list(s.scalars(q))

    def page(
        self, *, offset: int, limit: int, stage: str | None = None, created_by: str | None = None
    ) -> tuple[list[Generation], int]:
        with self.sessions() as s:
            q = select(Generation)
            if stage:
                q = q.where(Generation.stage == stage)
            if created_by is not None:
                q = q.where(Generation.created_by == created_by)
            count = s.scalar(select(func.count()).select_from(q.subquery())) or 0
            rows = s.scalars(q.order_by(Generation.created_at.desc(), Generation.id).offset(offset).limit(limit))
            return list(rows), count

    def later_in_chain(self, g: Generation) -> list[Generation]:
        """The generations of ``g``'s chain after it, in order."""
        with self.sessions() as s:
            q = (
                select(Generation)
                .where(Generation.chain_id == g.chain_id, Generation.chain_index > g.chain_index)
                .order_by(Generation.chain_index)
            )
            return list(s.scalars(q))

    def unfinished(self) -> Iterator[Generation]:
        with self.sessions() as s:
            # Cancellations first: they need no Ray, so they go through even while Ray is unreachable.
            q = (
                select(Generation)
                .where(Generation.stage.not_in(TERMINAL))
                .order_by(Generation.cancel_requested.desc(), Generation.created_at)
            )
            return iter(list(s.scalars(q)))

    def update(self, generation: Generation, **changes: Any) -> Generation:
        """Write ``changes`` if the row is still at ``generation.version``; returns the new row."""
        with self.sessions.begin() as s:
            result = s.execute(
                sa.update(Generation)
                .where(Generation.id == generation.id, Generation.version == generation.version)
                .values(version=generation.version + 1, updated_at=utcnow(), **changes)
            )
            if cast(CursorResult, result).rowcount != 1:
                raise StaleWrite(f"generation {generation.id} changed since version {generation.version}")
            updated = s.get_one(Generation, generation.id, populate_existing=True)
        for listener in self.listeners:
            listener(generation.id)
        return updated

    def count_by_stage(self) -> dict[str, int]:
        with self.sessions() as s:
            return dict(s.execute(select(Generation.stage, func.count()).group_by(Generation.stage)).all())

    # datasets

    def put_dataset(self, dataset: Dataset) -> None:
        with self.sessions.begin() as s:
            s.merge(dataset)

    def dataset(self, dataset_id: str) -> Dataset | None:
        with self.sessions() as s:
            return s.get(Dataset, dataset_id)
