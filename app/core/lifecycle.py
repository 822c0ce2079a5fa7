"""Every change of a job's state, in one place: claim, heartbeat and progress, succeed, fail,
cancel, requeue, recover lost, announce, expire, delete. The API cancels and deletes, the runner
(worker/runner.py) claims, reports progress and finishes, the sweeper (worker/sweeper.py)
recovers lost jobs, sends messages again and applies retention; all through these functions.

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

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import UNAVAILABLE, Sessions, retry_while_unavailable
from app.core.metrics import add_to_counter, observe
from app.core.mlflow_models import Registration
from app.core.models import Artifact, ArtifactRole, IdempotencyRecord, Job, JobStatus, Tenant, utcnow
from app.core.storage import ArtifactStore, StoredFile
from app.core.webhooks import queue_webhook
from worker.sanitize.formats import sanitized_name
from worker.sanitize.report import Report

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


# Jobs whose files one retention sweep deletes at most: a sweep must stay short.
EXPIRY_BATCH = 100


def back_in_queue(now: datetime, message: str) -> dict:
    """The values that return a running job to the queue, ready for a new claim; its message is
    still to be sent (``announced``), which the next sweep does."""
    return dict(status=JobStatus.queued, worker_id=None, started_at=None, heartbeat_at=None,
                enqueued_at=now, announced=False, progress_stage=None, progress_fraction=0.0,
                progress_message=message)


# What the runner reads.

def oldest_queued(sessions: Sessions) -> uuid.UUID | None:
    with sessions() as session:
        return session.scalar(select(Job.id).where(Job.status == JobStatus.queued)
                              .order_by(Job.created_at).limit(1))


def tenant_name(sessions: Sessions, job_id: uuid.UUID) -> str | None:
    with sessions() as session:
        return session.scalar(select(Tenant.name).join(Job, Job.tenant_id == Tenant.id).where(Job.id == job_id))


def job_inputs(sessions: Sessions, job_id: uuid.UUID) -> tuple[dict, Artifact, Artifact, str | None]:
    """The job's config, its model artifact, its samples artifact and where its model came from
    (model_source: a URL or MLflow model URI; None for an upload)."""
    with sessions() as session:
        job = session.get(Job, job_id)
        return job.config, job.artifact(ArtifactRole.model), job.artifact(ArtifactRole.samples), job.model_source


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
            out: Path, report: Report, model: Artifact, registration: Registration | None = None) -> JobStatus | None:
    """Moves the sanitized model and the trigger pictures from ``out`` into the store, and
    records the report, the MLflow registration (if any), the final state and its webhook in one
    transaction (None: the claim was lost)."""
    job_id = job_claim.job_id
    suffix = Path(model.key).suffix
    results = [store_file(store, out / report.model_file, f"jobs/{job_id}/sanitized_model{suffix}")]
    # Named after the upload, as `baerase sanitize` names its output after its input; report.json,
    # downloaded beside it, names it so too.
    download_name = sanitized_name(model.filename, suffix)[:255]
    report = report.model_copy(update={"model_file": download_name})

    def write_outcome() -> bool:
        with sessions() as session:
            # The state first: on PostgreSQL this locks the row, so the sweeper cannot requeue
            # the job between this check and the commit (SQLite locks the whole database).
            finished = session.execute(update(Job).where(*job_claim.holds()).values(
                status=JobStatus.succeeded, finished_at=utcnow(), progress_stage="report",
                progress_fraction=1.0, progress_message="done", report=report.to_json(),
                model_registration=registration.model_dump(mode="json") if registration else None)
                .returning(Job.started_at, Job.finished_at)).one_or_none()
            if finished is None:
                return recorded_before(session, job_claim, JobStatus.succeeded)
            stored = results[0]
            session.add(Artifact(job_id=job_id, role=ArtifactRole.sanitized_model, key=stored.key,
                                 filename=download_name,
                                 size=stored.size, sha256=stored.sha256))
            record_finished(session, JobStatus.succeeded, *finished)
            for stage, seconds in report.timings_s.items():
                if stage != "total":  # the run time is the job histogram's
                    observe(session, "stage", stage, seconds)
            queue_webhook(session, job_id)
            session.commit()
            return True

    try:
        # The pictures are the files the report names (trigger_key); the database keeps no copy.
        results += [store_file(store, out / trigger.file, trigger_key(job_id, trigger.name))
                    for trigger in report.triggers]
        recorded = retry_while_unavailable(f"storing the results of job {job_id}", write_outcome, settings.db_retry_s)
    except BaseException:
        remove_results(store, job_id, results[0])
        raise
    if not recorded:
        remove_results(store, job_id, results[0])
        return None
    return JobStatus.succeeded


def trigger_key(job_id: uuid.UUID, name: str) -> str:
    """Where a succeeded job's trigger picture lives in the artifact store."""
    return f"jobs/{job_id}/triggers/{name}.png"


def store_file(store: ArtifactStore, source: Path, key: str) -> StoredFile:
    staged = store.stage()
    try:
        staged.copy_from(source)
        return store.put(staged, key)
    finally:
        staged.discard()


def remove_results(store: ArtifactStore, job_id: uuid.UUID, sanitized_model: StoredFile) -> None:
    """Removes what ``succeed`` stored when its outcome was not recorded."""
    store.delete_prefix(sanitized_model.key)
    store.delete_prefix(f"jobs/{job_id}/triggers")


def record_finished(session: Session, status: JobStatus, started_at: datetime | None,
                    finished_at: datetime) -> None:
    """Counts a job that reached a final state, and its run time, for /metrics (a job that never
    started has no run time)."""
    add_to_counter(session, "finished_jobs", status.value, 1)
    if started_at is not None:
        observe(session, "job", status.value, (finished_at - started_at).total_seconds())


def finish(sessions: Sessions, settings: Settings, job_claim: Claim, status: JobStatus,
           error_code: str | None = None, error_message: str | None = None) -> JobStatus | None:
    """Records a final state without results (failed, cancelled), and its webhook (None: the
    claim was lost). Retried while the database is briefly unreachable."""
    def write_outcome() -> bool:
        with sessions() as session:
            finished = session.execute(update(Job).where(*job_claim.holds()).values(
                status=status, finished_at=utcnow(), error_code=error_code, error_message=error_message)
                .returning(Job.started_at, Job.finished_at)).one_or_none()
            if finished is None:
                return recorded_before(session, job_claim, status)
            record_finished(session, status, *finished)
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
        cancelled = session.execute(
            update(Job).where(lost, Job.cancel_requested.is_(True))
            .values(status=JobStatus.cancelled, finished_at=now).returning(Job.id, Job.started_at)).all()
        failed = session.execute(
            update(Job).where(lost, Job.attempts >= settings.job_max_attempts)
            .values(status=JobStatus.failed, finished_at=now, error_code="worker_lost",
                    error_message=f"the worker running this job stopped responding, on each of its "
                                  f"{settings.job_max_attempts} attempts (killed, out of memory, "
                                  "or its host went down); the workers' logs tell why")
            .returning(Job.id, Job.started_at)).all()
        for status, ended in ((JobStatus.cancelled, cancelled), (JobStatus.failed, failed)):
            for job_id, started_at in ended:
                record_finished(session, status, started_at, now)
                queue_webhook(session, job_id)
        cancelled, failed = [job_id for job_id, _ in cancelled], [job_id for job_id, _ in failed]
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
    """The queued jobs whose message must be sent (again), oldest first, stamped as taken now so
    that one sweeper takes each: those whose message never reached the broker (not announced,
    taken at the next sweep), and those whose last message is older than resend_queued_after_s
    (the broker may have lost it). ``mark_announced`` records each message that gets through."""
    now = utcnow()
    with sessions() as session:
        waiting = session.execute(
            update(Job).where(Job.status == JobStatus.queued, or_(
                and_(Job.announced.is_(False), Job.enqueued_at < now - timedelta(seconds=settings.sweep_interval_s)),
                Job.enqueued_at < now - timedelta(seconds=settings.resend_queued_after_s)))
            .values(enqueued_at=now, announced=False).returning(Job.id, Job.created_at)).all()
        session.commit()
    if waiting:
        log.info("sending the messages of %d queued jobs (again)", len(waiting))
    return [job_id for job_id, _ in sorted(waiting, key=lambda row: row.created_at)]


def mark_announced(sessions: Sessions, job_id: uuid.UUID) -> None:
    """Records that the job's message reached the broker. Unrecorded (the database briefly
    unreachable), the message is only sent again at the next sweep, which is harmless."""
    try:
        with sessions() as session:
            session.execute(update(Job).where(Job.id == job_id).values(announced=True))
            session.commit()
    except UNAVAILABLE as e:
        log.warning("job %s: could not record that its message was sent: %s", job_id, str(e).splitlines()[0])


# Retention.

def expire_finished_jobs(sessions: Sessions, store: ArtifactStore, settings: Settings) -> list[uuid.UUID]:
    """Deletes the files of jobs that finished more than artifact_retention_days ago (a batch at a
    time) and marks them expired; their records and reports stay. The files go first: a sweep
    cut short in between finds the job again and finishes the work."""
    cutoff = utcnow() - timedelta(days=settings.artifact_retention_days)
    with sessions() as session:
        due = list(session.scalars(
            select(Job.id).where(Job.expired_at.is_(None), Job.finished_at < cutoff)
            .order_by(Job.finished_at).limit(EXPIRY_BATCH)))
    for job_id in due:
        store.delete_prefix(f"jobs/{job_id}")
    if due:
        with sessions() as session:
            session.execute(update(Job).where(Job.id.in_(due)).values(expired_at=utcnow()))
            session.commit()
        log.info("retention: deleted the files of %d jobs that finished before %s", len(due), cutoff.isoformat())
    return due


def expire_idempotency_records(sessions: Sessions, settings: Settings) -> int:
    """Forgets Idempotency-Keys older than idempotency_retention_hours; returns how many."""
    cutoff = utcnow() - timedelta(hours=settings.idempotency_retention_hours)
    with sessions() as session:
        deleted = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < cutoff))
        session.commit()
    return deleted.rowcount


# The API.

def cancel_job(session: Session, job_id: uuid.UUID) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop (the runner checks
    between steps and marks it cancelled). Returns the job as it now is."""
    queued = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.cancelled, cancel_requested=True, finished_at=utcnow())
        .returning(Job.finished_at)).one_or_none()
    if queued is not None:
        record_finished(session, JobStatus.cancelled, None, queued.finished_at)
        queue_webhook(session, job_id)  # a worker delivers it
    else:
        session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.running)
                        .values(cancel_requested=True))
    session.commit()
    return session.get(Job, job_id, populate_existing=True)


def delete_job(session: Session, store: ArtifactStore, job_id: uuid.UUID) -> bool:
    """Deletes the job, its results and its files, unless it is running (False)."""
    deleted = session.execute(delete(Job).where(Job.id == job_id, Job.status != JobStatus.running)
                              .returning(Job.status)).one_or_none()
    if deleted is None:
        session.rollback()
        return False
    if deleted.status.finished:  # /metrics counts the jobs in the database
        add_to_counter(session, "finished_jobs", deleted.status.value, -1)
    session.commit()
    store.delete_prefix(f"jobs/{job_id}")
    return True
