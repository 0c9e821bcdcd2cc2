"""generations and datasets

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "generations",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("chain_id", sa.String(32), nullable=False),
        sa.Column("chain_index", sa.Integer, nullable=False),
        sa.Column("parent_id", sa.String(32), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True, unique=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("spec", JSONType, nullable=False),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("jobs", JSONType, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("progress", JSONType, nullable=False),
        sa.Column("timings", JSONType, nullable=False),
        sa.Column("metrics", JSONType, nullable=False),
        sa.Column("teacher_uri", sa.Text, nullable=True),
        sa.Column("model_uri", sa.Text, nullable=True),
        sa.Column("dataset_id", sa.String(32), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_generations_created_at", "generations", ["created_at"])
    op.create_index("ix_generations_chain_id", "generations", ["chain_id"])
    op.create_index("ix_generations_stage", "generations", ["stage"])
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("generation_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("manifest_uri", sa.Text, nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("stats", JSONType, nullable=False),
    )
    op.create_index("ix_datasets_generation_id", "datasets", ["generation_id"])


def downgrade() -> None:
    op.drop_table("datasets")
    op.drop_table("generations")
