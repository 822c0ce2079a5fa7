"""Operations: whether a queued job's message reached the broker (jobs.announced), retention
(jobs.expired_at), webhook secret rotation (the previous secret and when it retires), and the
/metrics running totals (metric_counters), filled from the jobs and uploads already stored.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FINISHED = ("succeeded", "failed", "cancelled")


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("previous_webhook_secret", sa.String(100)))
        batch.add_column(sa.Column("previous_secret_retires_at", sa.DateTime()))
    # Jobs queued before this revision had their message sent (or the resend timer covers them).
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("announced", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column("expired_at", sa.DateTime()))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("announced", existing_type=sa.Boolean(), server_default=None)
    op.create_index("ix_jobs_expiry", "jobs", ["expired_at", "finished_at"])

    counters = op.create_table(
        "metric_counters",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("label", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )
    connection = op.get_bind()
    jobs = sa.table("jobs", sa.column("status", sa.String()))
    artifacts = sa.table("artifacts", sa.column("role", sa.String()), sa.column("size", sa.BigInteger()))
    rows = [{"name": "finished_jobs", "label": status, "value": count} for status, count in connection.execute(
        sa.select(jobs.c.status, sa.func.count()).where(jobs.c.status.in_(FINISHED)).group_by(jobs.c.status))]
    for role, count, size in connection.execute(
            sa.select(artifacts.c.role, sa.func.count(), sa.func.coalesce(sa.func.sum(artifacts.c.size), 0))
            .where(artifacts.c.role.in_(["model", "samples"])).group_by(artifacts.c.role)):
        rows += [{"name": "uploads", "label": role, "value": count},
                 {"name": "upload_bytes", "label": role, "value": int(size)}]
    if rows:
        op.bulk_insert(counters, rows)


def downgrade() -> None:
    op.drop_table("metric_counters")
    op.drop_index("ix_jobs_expiry", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("expired_at")
        batch.drop_column("announced")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("previous_secret_retires_at")
        batch.drop_column("previous_webhook_secret")
