"""Finding a tenant's jobs: one by the id in a URL, or a page of them, newest first. Another
tenant's job is answered as absent."""

import base64
import json
import uuid
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.api.problems import Problem
from app.core.models import Job, JobStatus, Tenant


def canonical_uuid(text: str) -> uuid.UUID | None:
    """The UUID in its one canonical spelling (lowercase, hyphenated), else None: a job has one
    URL, so that caches, logs and rate limits see one job as one."""
    try:
        value = uuid.UUID(text)
    except ValueError:
        return None
    return value if str(value) == text else None


def find_job(session: Session, tenant: Tenant, job_id: str) -> Job:
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
