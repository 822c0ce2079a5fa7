"""Where a job's sanitized model went in MLflow: jobs.model_registration holds the outcome of
registering it (status, the new version's URI, the run, or the error), for jobs whose model came
from a models:/ or runs:/ URI; null for the others.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("model_registration", sa.JSON()))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("model_registration")
