"""Creating, finding, cancelling and deleting jobs, for one tenant at a time."""

import base64
import hashlib
import json
import math
import uuid
from datetime import datetime

from pydantic import AnyHttpUrl, ValidationError
from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import Artifact, ArtifactRole, IdempotencyRecord, Job, JobStatus, Tenant, utcnow
from app.problems import Problem, describe_validation_errors
from app.storage import ArtifactStore
from app.uploads import MODEL_SUFFIXES, JobForm, model_format, samples_suffix
from app.webhook_urls import UnsafeWebhookUrl, check_webhook_url
from app.webhooks import queue_webhook
from worker.sanitize.config import ARCHITECTURE_NAMES, SanitizeConfig

# Suggested wait before submitting again when the tenant has too many jobs: jobs take minutes.
QUOTA_RETRY_AFTER_S = 60


class JobOptions(SanitizeConfig):
    """The ``config`` form field: the engine's settings plus where to report the outcome."""

    webhook_url: AnyHttpUrl | None = None


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 reads as inf
        raise ValueError(f"{text} is out of range")
    return value


def refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_options(text: bytes | None) -> JobOptions:
    # NaN and Infinity are Python's extensions of JSON: PostgreSQL refuses them in a JSON column,
    # and no setting means anything with them.
    try:
        options = json.loads(text, parse_float=finite_float, parse_constant=refuse_constant) if text else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise Problem(422, f"config is not valid JSON ({e}); send a JSON object such as "
                           '{"seed": 0}') from None
    except RecursionError:
        raise Problem(422, "config is nested too deeply; send a JSON object such as "
                           '{"seed": 0}') from None
    if not isinstance(options, dict):
        raise Problem(422, 'config must be a JSON object such as {"seed": 0}')
    try:
        return JobOptions.model_validate(options)
    except ValidationError as e:
        errors = [{**error, "loc": f"config.{error['loc']}".rstrip(".")}
                  for error in describe_validation_errors(e.errors())]
        detail = "; ".join(f"{error['loc']}: {error['msg']}" for error in errors)
        raise Problem(422, f"invalid config: {detail} (see docs/config.md)", errors=errors) from None


def submit_job(session: Session, store: ArtifactStore, tenant: Tenant, form: JobForm,
               idempotency_key: str | None, settings: Settings) -> tuple[Job, bool]:
    """Checks the received form and queues its job; returns (job, whether it already existed).
    Files are moved into the store before the commit and removed again if it fails."""
    options = parse_options(form.config_text)
    webhook_url = str(options.webhook_url) if options.webhook_url else None
    if webhook_url:
        try:
            check_webhook_url(webhook_url, settings.webhook_allowed_hosts)
        except UnsafeWebhookUrl as e:
            raise Problem(422, f"invalid config: config.webhook_url: {e}",
                          errors=[{"loc": "config.webhook_url", "msg": str(e)}]) from None
    fmt = model_format(form.model.staged.path, form.model.filename)
    if fmt != "torchscript" and options.arch is None:
        raise Problem(422, f"{form.model.filename} holds bare weights ({fmt}); name their "
                           f'architecture in config, e.g. {{"arch": "small_cnn"}} (built-in: '
                           f"{', '.join(ARCHITECTURE_NAMES)}), or upload a TorchScript archive")
    samples_ext = samples_suffix(form.samples.staged.path, form.samples.filename)
    config = options.model_dump(mode="json", exclude={"webhook_url"})
    request_sha256 = hashlib.sha256(json.dumps(
        [form.model.staged.sha256, form.samples.staged.sha256, config, webhook_url], sort_keys=True
    ).encode()).hexdigest()

    if idempotency_key and (replay := idempotent_job(session, tenant, idempotency_key, request_sha256)):
        return replay, True
    # Taken first, so that concurrent submits of one tenant count one after the other: a row lock
    # on PostgreSQL, the write lock on SQLite; both held until the commit or rollback below.
    session.execute(update(Tenant).where(Tenant.id == tenant.id).values(name=Tenant.name)
                    .execution_options(synchronize_session=False))
    check_active_jobs(session, tenant, settings.max_active_jobs_per_tenant)
    job = Job(id=uuid.uuid4(), tenant_id=tenant.id, config=config, webhook_url=webhook_url,
              model_format=fmt)
    folder = f"jobs/{job.id}"
    try:
        for role, part, suffix in ((ArtifactRole.model, form.model, MODEL_SUFFIXES[fmt]),
                                   (ArtifactRole.samples, form.samples, samples_ext)):
            stored = store.put(part.staged, f"{folder}/{role.value}{suffix}")
            job.artifacts.append(Artifact(role=role, key=stored.key, filename=part.filename[:255],
                                          size=stored.size, sha256=stored.sha256))
        session.add(job)
        if idempotency_key:
            session.add(IdempotencyRecord(tenant_id=tenant.id, key=idempotency_key,
                                          request_sha256=request_sha256, job=job))
        session.commit()
    except BaseException as e:
        session.rollback()
        store.delete_prefix(folder)
        # A concurrent request with the same key won the race: answer as its retry.
        if isinstance(e, IntegrityError) and idempotency_key and (
                replay := idempotent_job(session, tenant, idempotency_key, request_sha256)):
            return replay, True
        raise
    return job, False


def check_active_jobs(session: Session, tenant: Tenant, limit: int) -> None:
    """429 when the tenant already has ``limit`` jobs queued or running."""
    active = session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant.id, Job.status.in_((JobStatus.queued, JobStatus.running))))
    if active >= limit:
        raise Problem(429, f"you have {active} jobs queued or running, the most this service allows "
                           f"(BAERASE_MAX_ACTIVE_JOBS_PER_TENANT={limit}); submit again once one "
                           "has finished, or cancel one", headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)})


def idempotent_job(session: Session, tenant: Tenant, key: str, request_sha256: str) -> Job | None:
    record = session.scalar(select(IdempotencyRecord).where(
        IdempotencyRecord.tenant_id == tenant.id, IdempotencyRecord.key == key))
    if record is None:
        return None
    if record.request_sha256 != request_sha256:
        raise Problem(422, f"Idempotency-Key {key!r} was already used for a different request "
                           f"(job {record.job_id}); use a new key for a new job")
    return record.job


def canonical_uuid(text: str) -> uuid.UUID | None:
    """The UUID in its one canonical spelling (lowercase, hyphenated), else None: a job has one
    URL, so that caches, logs and rate limits see one job as one."""
    try:
        value = uuid.UUID(text)
    except ValueError:
        return None
    return value if str(value) == text else None


def get_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    job_uuid = canonical_uuid(job_id)
    job = None
    if job_uuid is not None:
        job = session.scalar(select(Job).where(Job.id == job_uuid, Job.tenant_id == tenant.id))
    if job is None:  # another tenant's job is as absent as one that never existed
        raise Problem(404, f"there is no job {job_id}; list yours with GET /jobs")
    return job


def list_jobs(session: Session, tenant: Tenant, status: JobStatus | None, page_size: int,
              page_token: str | None) -> tuple[list[Job], str | None]:
    """Newest first; the page token is the (created_at, id) of the last job on the previous page."""
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status is not None:
        query = query.where(Job.status == status)
    if page_token:
        created_at, job_id = decode_page_token(page_token)
        query = query.where(or_(Job.created_at < created_at,
                                and_(Job.created_at == created_at, Job.id < job_id)))
    jobs = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(page_size + 1)))
    if len(jobs) <= page_size:
        return jobs, None
    last = jobs[page_size - 1]
    return jobs[:page_size], encode_page_token(last.created_at, last.id)


def encode_page_token(created_at: datetime, job_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at.isoformat(), str(job_id)]).encode()).decode()


def decode_page_token(token: str) -> tuple[datetime, uuid.UUID]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return datetime.fromisoformat(created_at), uuid.UUID(job_id)
    except (ValueError, TypeError, AttributeError, RecursionError):  # whatever a forged token holds
        raise Problem(422, "page_token is not valid; pass the next_page_token of the previous "
                           "page unchanged") from None


def cancel_job(session: Session, job: Job) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop (the worker checks
    between steps and marks it cancelled)."""
    queued = session.execute(
        update(Job).where(Job.id == job.id, Job.status == JobStatus.queued)
        .values(status=JobStatus.cancelled, cancel_requested=True, finished_at=utcnow()))
    if queued.rowcount == 1:
        queue_webhook(session, job.id)  # a worker delivers it
    else:
        session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.running)
                        .values(cancel_requested=True))
    session.commit()
    job = session.get(Job, job.id, populate_existing=True)
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise Problem(409, f"the job has already {job.status.value}; there is nothing to cancel")
    return job


def delete_job(session: Session, store: ArtifactStore, job: Job) -> None:
    deleted = session.execute(delete(Job).where(Job.id == job.id, Job.status != JobStatus.running))
    session.commit()
    if deleted.rowcount == 0:
        raise Problem(409, f"job {job.id} is running; cancel it (POST /jobs/{job.id}/cancel) and "
                           "delete it once it has stopped")
    store.delete_prefix(f"jobs/{job.id}")
