"""Every change of a job's state, in one place: claim, heartbeat and progress, succeed, fail,
cancel, requeue, recover lost, delete. The API cancels and deletes, the runner (worker/runner.py)
claims, reports progress and finishes, the sweeper (worker/sweeper.py) recovers lost jobs; all
through these functions.

A claim is an atomic queued -> running update that counts the attempt and names the worker, so a
job never runs twice at once however many messages or workers there are. Every later write by
the claim's holder (heartbeat, progress, results, the final state) applies only while the claim
still holds, so a worker that the sweeper gave up on cannot overwrite the run that replaced it.
A final state and its webhook message (app/core/webhooks.py) are committed together.
"""

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, delete, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import UNAVAILABLE, Sessions, retry_while_unavailable
from app.core.job_views import report_metrics
from app.core.models import Artifact, ArtifactRole, Job, JobMetric, JobStatus, Tenant, TriggerImage, utcnow
from app.core.storage import ArtifactStore
from app.core.webhooks import queue_webhook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """A worker's right to run one attempt of a job."""

    job_id: uuid.UUID
    attempt: int
    worker_id: str

    def holds(self):
        """The SQL condition under which the job is still ours to write."""
        return (Job.id == self.job_id, Job.status == JobStatus.running, Job.attempts == self.attempt,
                Job.worker_id == self.worker_id)


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def back_in_queue(now: datetime, message: str) -> dict:
    """The values that return a running job to the queue, ready for a new claim."""
    return dict(status=JobStatus.queued, worker_id=None, started_at=None, heartbeat_at=None,
                enqueued_at=now, progress_stage=None, progress_fraction=0.0, progress_message=message)


# What the runner reads.

def oldest_queued(sessions: Sessions) -> uuid.UUID | None:
    with sessions() as session:
        return session.scalar(select(Job.id).where(Job.status == JobStatus.queued)
                              .order_by(Job.created_at).limit(1))


def tenant_name(sessions: Sessions, job_id: uuid.UUID) -> str | None:
    with sessions() as session:
        return session.scalar(select(Tenant.name).join(Job, Job.tenant_id == Tenant.id).where(Job.id == job_id))


def job_inputs(sessions: Sessions, job_id: uuid.UUID) -> tuple[dict, Artifact, Artifact]:
    """The job's config, its model artifact and its samples artifact."""
    with sessions() as session:
        job = session.get(Job, job_id)
        return job.config, job.artifact(ArtifactRole.model), job.artifact(ArtifactRole.samples)


# The claim's holder: the runner.

def claim(sessions: Sessions, job_id: uuid.UUID) -> Claim | None:
    """Takes the job if it is still queued (None if not: another worker took it, or it was
    cancelled or deleted)."""
    worker_id, now = this_worker(), utcnow()
    with sessions() as session:
        attempt = session.scalar(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(status=JobStatus.running, attempts=Job.attempts + 1, worker_id=worker_id,
                    started_at=now, heartbeat_at=now, progress_message="starting")
            .returning(Job.attempts))
        session.commit()
    return Claim(job_id, attempt, worker_id) if attempt is not None else None


def update_claimed(sessions: Sessions, job_claim: Claim, **values) -> bool:
    """Writes the values (heartbeat_at, progress_*) while the claim holds; False once it no
    longer does."""
    with sessions() as session:
        written = session.execute(update(Job).where(*job_claim.holds()).values(**values))
        session.commit()
    return written.rowcount == 1


def cancel_requested(sessions: Sessions, job_id: uuid.UUID) -> bool:
    """Whether someone asked to cancel the job, or deleted it (nobody wants the result then)."""
    with sessions() as session:
        requested = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return requested is not False


def succeed(sessions: Sessions, store: ArtifactStore, settings: Settings, job_claim: Claim,
            out: Path, report: dict, model: Artifact) -> JobStatus | None:
    """Moves the sanitized model from ``out`` into the store and records report, metrics, trigger
    pictures, the final state and its webhook in one transaction (None: the claim was lost)."""
    job_id = job_claim.job_id
    suffix = Path(model.key).suffix
    staged = store.stage()
    try:
        staged.copy_from(out / f"model{suffix}")
        stored = store.put(staged, f"jobs/{job_id}/sanitized_model{suffix}")
    finally:
        staged.discard()
    scores = {(s["class"], s["family"]): s["score"] for s in report["class_scores"]}

    def write_outcome() -> bool:
        with sessions() as session:
            # The state first: on PostgreSQL this locks the row, so the sweeper cannot requeue
            # the job between this check and the commit (SQLite locks the whole database).
            finished = session.execute(update(Job).where(*job_claim.holds()).values(
                status=JobStatus.succeeded, finished_at=utcnow(), progress_stage="report",
                progress_fraction=1.0, progress_message="done",
                backdoor_detected=report["backdoor_detected"],
                detected_targets=report["detected_targets"], report=report))
            if finished.rowcount == 0:
                return recorded_before(session, job_claim, JobStatus.succeeded)
            session.add(Artifact(job_id=job_id, role=ArtifactRole.sanitized_model, key=stored.key,
                                 filename=f"{Path(model.filename).stem}.sanitized{suffix}"[:255],
                                 size=stored.size, sha256=stored.sha256))
            session.add_all(
                TriggerImage(job_id=job_id, name=Path(t["file"]).stem, class_index=t["class"],
                             family=t["family"], kind=t["kind"], score=scores.get((t["class"], t["family"])),
                             png=(out / t["file"]).read_bytes())
                for t in report["triggers"])
            session.add_all(JobMetric(job_id=job_id, name=name, value=value)
                            for name, value in report_metrics(report).items())
            session.flush()
            queue_webhook(session, job_id)
            session.commit()
            return True

    try:
        recorded = retry_while_unavailable(f"storing the results of job {job_id}", write_outcome, settings.db_retry_s)
    except BaseException:
        store.delete_prefix(stored.key)
        raise
    if not recorded:
        store.delete_prefix(stored.key)
        return None
    return JobStatus.succeeded


def finish(sessions: Sessions, settings: Settings, job_claim: Claim, status: JobStatus,
           error_code: str | None = None, error_message: str | None = None) -> JobStatus | None:
    """Records a final state without results (failed, cancelled), and its webhook (None: the
    claim was lost). Retried while the database is briefly unreachable."""
    def write_outcome() -> bool:
        with sessions() as session:
            finished = session.execute(update(Job).where(*job_claim.holds()).values(
                status=status, finished_at=utcnow(), error_code=error_code, error_message=error_message))
            if finished.rowcount == 0:
                return recorded_before(session, job_claim, status)
            queue_webhook(session, job_claim.job_id)
            session.commit()
            return True

    recorded = retry_while_unavailable(f"marking job {job_claim.job_id} {status.value}", write_outcome, settings.db_retry_s)
    return status if recorded else None


def recorded_before(session: Session, job_claim: Claim, status: JobStatus) -> bool:
    """Whether our own earlier try already committed this outcome (its answer was lost, so it
    was retried), rather than the job having been taken from us."""
    return session.scalar(select(Job.id).where(
        Job.id == job_claim.job_id, Job.status == status, Job.attempts == job_claim.attempt,
        Job.worker_id == job_claim.worker_id)) is not None


def requeue(sessions: Sessions, job_claim: Claim) -> None:
    """Puts a job back in the queue when its worker is being stopped, so it runs again later;
    being stopped does not use up one of its attempts."""
    try:
        update_claimed(sessions, job_claim, attempts=Job.attempts - 1,
                       **back_in_queue(utcnow(), "requeued: the worker was stopped"))
    except UNAVAILABLE:  # no time to wait while stopping: the sweeper requeues it later
        log.warning("job %s: could not requeue it; the sweeper will, once its heartbeat is stale",
                    job_claim.job_id)


# The sweeper.

def recover_lost_jobs(sessions: Sessions, settings: Settings) -> list[uuid.UUID]:
    """Settles the running jobs whose heartbeat is older than heartbeat_timeout_s (their worker
    is gone): cancelled if a cancel was asked for, failed (worker_lost) once they have used
    job_max_attempts, else queued again. Returns those queued again."""
    now = utcnow()
    lost = and_(Job.status == JobStatus.running,
                Job.heartbeat_at < now - timedelta(seconds=settings.heartbeat_timeout_s))
    with sessions() as session:
        cancelled = session.scalars(
            update(Job).where(lost, Job.cancel_requested.is_(True))
            .values(status=JobStatus.cancelled, finished_at=now).returning(Job.id)).all()
        failed = session.scalars(
            update(Job).where(lost, Job.attempts >= settings.job_max_attempts)
            .values(status=JobStatus.failed, finished_at=now, error_code="worker_lost",
                    error_message=f"the worker running this job stopped responding, on each of its "
                                  f"{settings.job_max_attempts} attempts (killed, out of memory, "
                                  "or its host went down); the workers' logs tell why")
            .returning(Job.id)).all()
        for job_id in (*cancelled, *failed):
            queue_webhook(session, job_id)
        requeued = session.scalars(
            update(Job).where(lost).values(**back_in_queue(now, "requeued: its worker stopped responding"))
            .returning(Job.id)).all()
        session.commit()
    for job_id in cancelled:
        log.warning("job %s: its worker stopped responding after a cancel; cancelled", job_id)
    for job_id in failed:
        log.warning("job %s: its worker stopped responding on its last attempt; failed", job_id)
    for job_id in requeued:
        log.warning("job %s: its worker stopped responding; queued again", job_id)
    return list(requeued)


def take_waiting_jobs(sessions: Sessions, settings: Settings) -> list[uuid.UUID]:
    """The queued jobs whose last message is older than resend_queued_after_s, stamped as sent
    now (so that one sweeper takes each)."""
    now = utcnow()
    with sessions() as session:
        waiting = session.scalars(
            update(Job).where(Job.status == JobStatus.queued,
                              Job.enqueued_at < now - timedelta(seconds=settings.resend_queued_after_s))
            .values(enqueued_at=now).returning(Job.id)).all()
        session.commit()
    if waiting:
        log.info("sending the messages of %d queued jobs again", len(waiting))
    return list(waiting)


# The API.

def cancel_job(session: Session, job_id: uuid.UUID) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop (the runner checks
    between steps and marks it cancelled). Returns the job as it now is."""
    queued = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.cancelled, cancel_requested=True, finished_at=utcnow()))
    if queued.rowcount == 1:
        queue_webhook(session, job_id)  # a worker delivers it
    else:
        session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.running)
                        .values(cancel_requested=True))
    session.commit()
    return session.get(Job, job_id, populate_existing=True)


def delete_job(session: Session, store: ArtifactStore, job_id: uuid.UUID) -> bool:
    """Deletes the job, its results and its files, unless it is running (False)."""
    deleted = session.execute(delete(Job).where(Job.id == job_id, Job.status != JobStatus.running))
    session.commit()
    if deleted.rowcount == 0:
        return False
    store.delete_prefix(f"jobs/{job_id}")
    return True
