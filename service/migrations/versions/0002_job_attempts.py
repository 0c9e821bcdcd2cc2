"""job attempts and user retries

Each job of a generation keeps every attempt: ``jobs`` goes from ``{kind: submission id}`` to
``{kind: [attempt, ...]}`` (see ``service.states.Attempt``); ``retries`` counts the retries a user asked for.

Revision ID: 0002
Revises: 0001
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("retries", sa.Integer, nullable=False, server_default="0"))
    generations = sa.table(
        "generations",
        sa.column("id", sa.String),
        sa.column("jobs", JSONType),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    conn = op.get_bind()
    for gid, jobs, updated_at in conn.execute(
        sa.select(generations.c.id, generations.c.jobs, generations.c.updated_at)
    ).all():
        if not jobs or all(isinstance(v, list) for v in jobs.values()):
            continue
        when = (updated_at or dt.datetime.now(dt.UTC)).isoformat()
        # An old job was submitted once, under its old id; its status is Ray's to tell on the next tick.
        converted = {
            kind: [{"id": sid, "n": 1, "round": 0, "submitted": True, "status": "PENDING", "created_at": when}]
            for kind, sid in jobs.items()
        }
        conn.execute(sa.update(generations).where(generations.c.id == gid).values(jobs=converted))


def downgrade() -> None:
    generations = sa.table("generations", sa.column("id", sa.String), sa.column("jobs", JSONType))
    conn = op.get_bind()
    for gid, jobs in conn.execute(sa.select(generations.c.id, generations.c.jobs)).all():
        if jobs:
            latest = {kind: attempts[-1]["id"] for kind, attempts in jobs.items() if attempts}
            conn.execute(sa.update(generations).where(generations.c.id == gid).values(jobs=latest))
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("retries")
