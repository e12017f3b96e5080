"""rejected_records.digest: a refused record is kept once, however often it is delivered again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

A refused message is acknowledged only after its transaction commits, so a collector stopped in between
gets it again, and a device that hears no receipt sends it again: each copy used to add a row. The digest
(sha256 of the topic, a NUL byte and the record's bytes) is unique now and the collector inserts with
ON CONFLICT DO NOTHING. Rows already there get theirs; of several copies of one record, the oldest does and
the others keep NULL (not deleted: a migration does not throw away what was kept). The definition is frozen
here, as 0001 freezes its views; `results_db.ingest.rejected_digest` must compute the same.
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _digest(topic: str, record: bytes) -> str:
    return hashlib.sha256(topic.encode("utf-8", "surrogatepass") + b"\0" + bytes(record)).hexdigest()


def upgrade() -> None:
    op.add_column("rejected_records", sa.Column("digest", sa.String(length=64), nullable=True))
    rejected = sa.table(
        "rejected_records",
        sa.column("id", sa.BigInteger()),
        sa.column("topic", sa.Text()),
        sa.column("record", sa.LargeBinary()),
        sa.column("digest", sa.String(length=64)),
    )
    connection = op.get_bind()
    seen = set()
    firsts = []
    rows = connection.execute(
        sa.select(rejected.c.id, rejected.c.topic, rejected.c.record).order_by(rejected.c.id)
    )
    for row_id, topic, record in rows:
        digest = _digest(topic, record)
        if digest not in seen:
            seen.add(digest)
            firsts.append({"row_id": row_id, "new_digest": digest})
    if firsts:
        connection.execute(
            rejected.update()
            .where(rejected.c.id == sa.bindparam("row_id"))
            .values(digest=sa.bindparam("new_digest")),
            firsts,
        )
    op.create_index(op.f("ix_rejected_records_digest"), "rejected_records", ["digest"], unique=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_rejected_records_digest"), table_name="rejected_records")
    with op.batch_alter_table("rejected_records") as batch:
        batch.drop_column("digest")
