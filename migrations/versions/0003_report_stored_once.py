"""The report stored once: the jobs' report column is the only copy of its numbers (the
backdoor_detected and detected_targets columns and the job_metrics rows go), trigger pictures
move from database blobs to the artifact store, and /metrics' duration histograms are kept as
bucket counts (duration_buckets) filled from the jobs and metric rows already stored.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import math
import uuid
from pathlib import Path

import sqlalchemy as sa
from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# app/core/metrics.py's histogram bounds when this migration was written.
BUCKETS_S = {"job": (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, math.inf),
             "stage": (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, math.inf)}
FINISHED = ("succeeded", "failed", "cancelled")
# The report sections whose numbers job_metrics held, by dotted path.
METRIC_SECTIONS = ("clean_accuracy", "recovered_asr", "timings_s", "sample_accuracy", "backdoor_probability")

jobs = sa.table("jobs", sa.column("id", sa.Uuid()), sa.column("status", sa.String()),
                sa.column("started_at", sa.DateTime()), sa.column("finished_at", sa.DateTime()),
                sa.column("report", sa.JSON()), sa.column("backdoor_detected", sa.Boolean()),
                sa.column("detected_targets", sa.JSON()))
job_metrics = sa.table("job_metrics", sa.column("job_id", sa.Uuid()), sa.column("name", sa.String()),
                       sa.column("value", sa.Float()))
trigger_images = sa.table("trigger_images", sa.column("job_id", sa.Uuid()), sa.column("name", sa.String()),
                          sa.column("class_index", sa.Integer()), sa.column("family", sa.String()),
                          sa.column("kind", sa.String()), sa.column("score", sa.Float()),
                          sa.column("png", sa.LargeBinary()))


def artifact_root() -> Path:
    """The artifact store's directory: the one `baerase db upgrade` passes, else the settings'."""
    directory = context.config.attributes.get("artifact_dir")
    if directory is None:
        from app.core.config import Settings

        directory = Settings().artifact_dir
    return Path(directory)


def trigger_path(root: Path, job_id: uuid.UUID, name: str) -> Path:
    return root / "jobs" / str(job_id) / "triggers" / f"{name}.png"


def upgrade() -> None:
    connection = op.get_bind()
    duration_buckets = op.create_table(
        "duration_buckets",
        sa.Column("histogram", sa.String(16), primary_key=True),
        sa.Column("label", sa.String(32), primary_key=True),
        sa.Column("bucket", sa.Integer(), primary_key=True),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("total_s", sa.Double(), nullable=False),
    )
    counts: dict[tuple[str, str, int], list] = {}

    def count(histogram: str, label: str, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        bucket = next(i for i, bound in enumerate(BUCKETS_S[histogram]) if seconds <= bound)
        entry = counts.setdefault((histogram, label, bucket), [0, 0.0])
        entry[0] += 1
        entry[1] += seconds

    for status, started, finished in connection.execute(
            sa.select(jobs.c.status, jobs.c.started_at, jobs.c.finished_at)
            .where(jobs.c.status.in_(FINISHED), jobs.c.started_at.is_not(None), jobs.c.finished_at.is_not(None))):
        count("job", status, (finished - started).total_seconds())
    for name, value in connection.execute(sa.select(job_metrics.c.name, job_metrics.c.value)
                                          .where(job_metrics.c.name.like("timings_s.%"))):
        if name != "timings_s.total":
            count("stage", name.removeprefix("timings_s."), value)
    if counts:
        op.bulk_insert(duration_buckets, [
            {"histogram": histogram, "label": label, "bucket": bucket, "count": n, "total_s": total}
            for (histogram, label, bucket), (n, total) in counts.items()])

    # The columns were copies of the report's own fields; a report without them gets them.
    for job_id, report, detected, targets in connection.execute(
            sa.select(jobs.c.id, jobs.c.report, jobs.c.backdoor_detected, jobs.c.detected_targets)
            .where(jobs.c.report.is_not(None))).all():
        if "backdoor_detected" not in report or "detected_targets" not in report:
            connection.execute(jobs.update().where(jobs.c.id == job_id).values(
                report={"backdoor_detected": bool(detected), "detected_targets": targets or []} | report))

    root = None
    for job_id, name, png in connection.execute(
            sa.select(trigger_images.c.job_id, trigger_images.c.name, trigger_images.c.png)):
        root = root or artifact_root()
        path = trigger_path(root, job_id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)

    op.drop_table("trigger_images")
    op.drop_table("job_metrics")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("detected_targets")
        batch.drop_column("backdoor_detected")


def downgrade() -> None:
    connection = op.get_bind()
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("backdoor_detected", sa.Boolean()))
        batch.add_column(sa.Column("detected_targets", sa.JSON()))
    op.create_table(
        "trigger_images",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("class_index", sa.Integer(), nullable=False),
        sa.Column("family", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("score", sa.Float()),
        sa.Column("png", sa.LargeBinary(), nullable=False),
        sa.UniqueConstraint("job_id", "name"),
    )
    op.create_table(
        "job_metrics",
        sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("value", sa.Double(), nullable=False),
    )

    root = None
    for job_id, report in connection.execute(sa.select(jobs.c.id, jobs.c.report)
                                             .where(jobs.c.report.is_not(None))).all():
        connection.execute(jobs.update().where(jobs.c.id == job_id).values(
            backdoor_detected=report["backdoor_detected"], detected_targets=report["detected_targets"]))
        metrics = report_metrics(report)
        if metrics:
            connection.execute(job_metrics.insert(), [{"job_id": job_id, "name": name, "value": value}
                                                      for name, value in metrics.items()])
        scores = {(s["class"], s["family"]): s.get("score", s.get("log_ratio")) for s in report["class_scores"]}
        for trigger in report.get("triggers", []):
            root = root or artifact_root()
            name = Path(trigger["file"]).stem
            path = trigger_path(root, job_id, name)
            if not path.is_file():  # expired or deleted by hand: nothing to put back
                continue
            connection.execute(trigger_images.insert().values(
                job_id=job_id, name=name, class_index=trigger["class"], family=trigger["family"],
                kind=trigger["kind"], score=scores.get((trigger["class"], trigger["family"])),
                png=path.read_bytes()))
    op.drop_table("duration_buckets")


def report_metrics(report: dict) -> dict[str, float]:
    """The report's numbers by dotted path (clean_accuracy.after, recovered_asr.0.before, ...),
    as job_metrics held them."""
    metrics = {}

    def walk(path: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{path}.{key}", item)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            metrics[path] = float(value)

    for section in METRIC_SECTIONS:
        walk(section, report.get(section))
    return metrics
