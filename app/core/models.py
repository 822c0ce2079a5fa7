"""The service's tables. Uploaded and sanitized models and the trigger pictures live in the
artifact store; the database keeps the models' keys and checksums, and each job's report once
(worker/sanitize/report.py; the trigger pictures are the files its ``triggers`` list names).

The jobs table is the source of truth for every job's state; a broker message only says "job X
is ready" and can be lost or sent twice without harm (see app/core/lifecycle.py)."""

import uuid
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Enum, Float, ForeignKey, Index,
                        String, Text, TypeDecorator, UniqueConstraint, Uuid)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in Python, naive UTC in the database: SQLite keeps no time zone, and
    comparisons (pagination) must mean the same on both backends."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.astimezone(UTC).replace(tzinfo=None) if value is not None else None

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=UTC) if value is not None else None


def utcnow() -> datetime:
    return datetime.now(UTC)


def string_enum(enum: type[StrEnum]) -> Enum:
    # Plain VARCHAR of the values: no native ENUM type to migrate on PostgreSQL.
    return Enum(enum, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class DeliveryStatus(StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class ArtifactRole(StrEnum):
    model = "model"
    samples = "samples"
    sanitized_model = "sanitized_model"


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # Signs this tenant's webhooks; kept in the clear because signing needs it (whsec_<base64>).
    webhook_secret: Mapped[str] = mapped_column(String(100))
    # The secret before the last rotation, which also signs webhooks until it retires: receivers
    # switch over within that grace period (app/core/webhooks.py).
    previous_webhook_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_retires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key
    prefix: Mapped[str] = mapped_column(String(12))  # to tell keys apart without the secret
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_expiry", "expired_at", "finished_at"),  # retention's sweep
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[JobStatus] = mapped_column(string_enum(JobStatus), default=JobStatus.queued)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Last time a broker message was sent for it: the sweeper sends again when it waits too long.
    enqueued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Whether that message reached the broker. False until it does (the broker was down at submit,
    # or the job was handed back): the next sweep sends it, without waiting for resend_queued_after_s.
    announced: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(default=0)  # claims so far, the running one included
    worker_id: Mapped[str | None] = mapped_column(String(255))  # host:pid that runs it
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # stamped while it runs
    progress_stage: Mapped[str | None] = mapped_column(String(32))
    progress_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    progress_message: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error_code: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    config: Mapped[dict] = mapped_column(JSON)  # SanitizeConfig, defaults filled in
    webhook_url: Mapped[str | None] = mapped_column(Text)
    model_format: Mapped[str] = mapped_column(String(16))  # torchscript | state_dict | safetensors
    # The URL or URI the model was fetched from (model_url), credentials and query string left
    # out; None for an uploaded model.
    model_source: Mapped[str | None] = mapped_column(Text)
    # For a model from MLflow (models:/, runs:/): where its sanitized model went, or why it did
    # not (app/core/mlflow_models.py, Registration); written with the job's result.
    model_registration: Mapped[dict | None] = mapped_column(JSON)
    report: Mapped[dict | None] = mapped_column(JSON, deferred=True)  # report.json, once succeeded
    # When retention removed its files (models, samples, trigger pictures); the record stays.
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    artifacts: Mapped[list["Artifact"]] = relationship(lazy="selectin", passive_deletes=True)

    def artifact(self, role: ArtifactRole) -> "Artifact | None":
        return next((a for a in self.artifacts if a.role == role), None)


class Artifact(Base):
    """A file in the artifact store that belongs to a job."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    role: Mapped[ArtifactRole] = mapped_column(string_enum(ArtifactRole))
    key: Mapped[str] = mapped_column(String(255))
    filename: Mapped[str] = mapped_column(String(255))  # what the user called it
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))


class DurationBucket(Base):
    """Finished jobs' run times (by final status) and stage times (by stage) as histogram buckets:
    how many values fell in the bucket and their sum. Added to in the transaction that finishes a
    job, so that a /metrics scrape reads these few rows however many jobs have run
    (app/core/metrics.py)."""

    __tablename__ = "duration_buckets"

    histogram: Mapped[str] = mapped_column(String(16), primary_key=True)  # job | stage
    label: Mapped[str] = mapped_column(String(32), primary_key=True)  # a final status, or a stage
    bucket: Mapped[int] = mapped_column(primary_key=True)  # index of the smallest bound that holds the values
    count: Mapped[int] = mapped_column(BigInteger)
    total_s: Mapped[float]


class MetricCounter(Base):
    """A running total behind /metrics, changed in the transaction of what it counts: finished
    jobs by status, uploads and uploaded bytes by part (app/core/metrics.py)."""

    __tablename__ = "metric_counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    label: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class IdempotencyRecord(Base):
    """The job a tenant's Idempotency-Key created, and a hash of the request that created it."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("tenant_id", "key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    request_sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship()


class WebhookDelivery(Base):
    """One webhook message about a job that reached a final state, written in the same transaction
    as that state (so none is lost), and its delivery attempts so far."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    message_id: Mapped[str] = mapped_column(String(64), unique=True)  # the webhook-id header
    event_type: Mapped[str] = mapped_column(String(32))  # job.succeeded, job.failed, job.cancelled
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)  # the exact body, the same on every attempt
    status: Mapped[DeliveryStatus] = mapped_column(string_enum(DeliveryStatus), default=DeliveryStatus.pending)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=utcnow)
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    job: Mapped[Job] = relationship()
