"""Distributed workers: job claims (attempts, worker, heartbeat), broker message bookkeeping,
per-tenant webhook secrets and the webhook delivery log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import base64
import secrets

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Columns that must not be NULL are added nullable, filled for the existing rows, then
    # tightened: SQLite cannot add a NOT NULL column without a constant default.
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("webhook_secret", sa.String(100)))
    tenants = sa.table("tenants", sa.column("id", sa.Integer()), sa.column("webhook_secret", sa.String()))
    connection = op.get_bind()
    for (tenant_id,) in connection.execute(sa.select(tenants.c.id)).all():
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        connection.execute(tenants.update().where(tenants.c.id == tenant_id).values(webhook_secret=secret))
    with op.batch_alter_table("tenants") as batch:
        batch.alter_column("webhook_secret", existing_type=sa.String(100), nullable=False)

    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("enqueued_at", sa.DateTime()))
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("worker_id", sa.String(255)))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime()))
    jobs = sa.table("jobs", sa.column("enqueued_at", sa.DateTime()), sa.column("created_at", sa.DateTime()),
                    sa.column("status", sa.String()), sa.column("attempts", sa.Integer()),
                    sa.column("started_at", sa.DateTime()), sa.column("heartbeat_at", sa.DateTime()))
    connection.execute(jobs.update().values(enqueued_at=jobs.c.created_at))
    # A job that has started counts as one attempt; one running now gets a heartbeat from its
    # start, so that the sweeper requeues it if no worker of this version takes it up.
    connection.execute(jobs.update().where(jobs.c.status != "queued").values(attempts=1))
    connection.execute(jobs.update().where(jobs.c.status == "running").values(heartbeat_at=jobs.c.started_at))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("enqueued_at", existing_type=sa.DateTime(), nullable=False)

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("message_id", sa.String(64), nullable=False, unique=True),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.Enum("pending", "delivered", "failed", native_enum=False, length=16),
                  nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime()),
        sa.Column("last_status_code", sa.Integer()),
        sa.Column("last_error", sa.Text()),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("delivered_at", sa.DateTime()),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    with op.batch_alter_table("jobs") as batch:
        for column in ("heartbeat_at", "worker_id", "attempts", "enqueued_at"):
            batch.drop_column(column)
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("webhook_secret")
