"""principals: who created each generation, idempotency keys per principal, an audit table

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
# 0001 made the key unique without naming the constraint: SQLite's batch mode finds it by this convention,
# PostgreSQL named it itself.
NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _old_unique_name() -> str:
    return (
        "generations_idempotency_key_key"
        if op.get_bind().dialect.name == "postgresql"
        else "uq_generations_idempotency_key"
    )


def upgrade() -> None:
    with op.batch_alter_table("generations", naming_convention=NAMING) as batch:
        batch.add_column(sa.Column("created_by", sa.String(64), nullable=False, server_default="default"))
        batch.drop_constraint(_old_unique_name(), type_="unique")
        batch.create_unique_constraint("uq_generations_principal_key", ["created_by", "idempotency_key"])
        batch.create_index("ix_generations_created_by", ["created_by"])
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("principal", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("detail", JSONType, nullable=False),
    )
    op.create_index("ix_audit_at", "audit", ["at"])
    op.create_index("ix_audit_principal", "audit", ["principal"])


def downgrade() -> None:
    op.drop_table("audit")
    with op.batch_alter_table("generations", naming_convention=NAMING) as batch:
        batch.drop_index("ix_generations_created_by")
        batch.drop_constraint("uq_generations_principal_key", type_="unique")
        batch.create_unique_constraint(_old_unique_name(), ["idempotency_key"])
        batch.drop_column("created_by")
