"""Turning a received upload or fetched URL (app/api/uploads.py) into a queued job: the config's checks, the
tenant's limit on active jobs, and Idempotency-Key replays. Refusals are problem details."""

import hashlib
import json
import uuid

from pydantic import AnyHttpUrl, ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.api.problems import Problem
from app.api.uploads import JobForm, model_format, samples_suffix
from app.core.config import Settings
from app.core.metrics import add_to_counter
from app.core.models import Artifact, ArtifactRole, IdempotencyRecord, Job, JobStatus, Tenant
from app.core.storage import ArtifactStore
from app.core.webhook_urls import UnsafeUrl, check_webhook_url
from worker.sanitize.architecture_names import ARCHITECTURE_HELP
from worker.sanitize.config import SanitizeConfig
from worker.sanitize.config_json import describe_invalid_config, parse_config_json
from worker.sanitize.formats import MODEL_SUFFIXES

# Suggested wait before submitting again when the tenant has too many jobs: jobs take minutes.
QUOTA_RETRY_AFTER_S = 60


class JobOptions(SanitizeConfig):
    """The ``config`` form field: the engine's settings plus where to report the outcome."""

    webhook_url: AnyHttpUrl | None = None


def parse_options(text: bytes | None) -> JobOptions:
    try:
        options = parse_config_json(text) if text else {}
        return JobOptions.model_validate(options)
    except ValidationError as e:
        detail, errors = describe_invalid_config(e.errors())
        raise Problem(422, detail, errors=errors) from None
    except ValueError as e:
        raise Problem(422, str(e)) from None


def submit_job(session: Session, store: ArtifactStore, tenant: Tenant, form: JobForm,
               idempotency_key: str | None, settings: Settings) -> tuple[Job, bool]:
    """Checks the received form and queues its job; returns (job, whether it already existed).
    Files are moved into the store before the commit and removed again if it fails."""
    options = parse_options(form.config_text)
    webhook_url = str(options.webhook_url) if options.webhook_url else None
    if webhook_url:
        try:
            check_webhook_url(webhook_url, settings.webhook_allowed_hosts)
        except UnsafeUrl as e:
            raise Problem(422, f"invalid config: config.webhook_url: {e}",
                          errors=[{"loc": "config.webhook_url", "msg": str(e)}]) from None
    fmt = model_format(form.model.staged.path, form.model.filename)
    if fmt != "torchscript" and options.arch is None:
        raise Problem(422, f"{form.model.filename} holds bare weights ({fmt}); name their "
                           f'architecture in config, e.g. {{"arch": "torchvision:resnet18"}} ({ARCHITECTURE_HELP}), '
                           "or upload a TorchScript archive")
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
              model_format=fmt, model_source=form.model_source)
    folder = f"jobs/{job.id}"
    try:
        for role, part, suffix in ((ArtifactRole.model, form.model, MODEL_SUFFIXES[fmt]),
                                   (ArtifactRole.samples, form.samples, samples_ext)):
            stored = store.put(part.staged, f"{folder}/{role.value}{suffix}")
            job.artifacts.append(Artifact(role=role, key=stored.key, filename=part.filename[:255],
                                          size=stored.size, sha256=stored.sha256))
            add_to_counter(session, "uploads", role.value, 1)
            add_to_counter(session, "upload_bytes", role.value, stored.size)
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
