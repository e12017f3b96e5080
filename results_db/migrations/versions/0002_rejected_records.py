"""rejected_records: what the collector could not store where it belongs, with the reason.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Before this table a refused record (NaN, an id too long for the columns, another device's run, a row that
conflicts with a stored one) was counted, logged and acknowledged: gone. Now it is kept here, and the
device's receipt says it was refused.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejected_records",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("received_unix", sa.Double(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=True),
        sa.Column("kind", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("record", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rejected_records")),
    )
    op.create_index(op.f("ix_rejected_records_device_id"), "rejected_records", ["device_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_rejected_records_device_id"), table_name="rejected_records")
    op.drop_table("rejected_records")
