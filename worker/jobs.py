"""Running jobs from the database: claim a queued job, run the engine on its files, store what it
made. ``run_job`` runs one job by id (what the Celery task calls, see worker/tasks.py); ``work``
polls the database for queued jobs (the worker of the embedded mode, and `baerase worker` without
a broker).

A claim is an atomic queued -> running update that counts the attempt and names the worker, so a
job never runs twice at once however many messages or workers there are. While the job runs, a
heartbeat thread stamps ``heartbeat_at``; every later write about the job (progress, results, the
final state) applies only while the claim still holds, so a worker that the sweeper gave up on
(worker/sweeper.py) cannot overwrite the run that replaced it. Writes that matter are retried
while the database is briefly unreachable.

This module uses the database but does not import torch: the engine (which imports no web, queue
or database code) runs in a sandboxed child process for each job (worker/sandbox.py), which also
enforces the job's wall-time, CPU-time and memory limits on every kind of worker.
"""

import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db import UNAVAILABLE, retry_while_unavailable
from app.logging_setup import job_context_from_db
from app.models import Artifact, ArtifactRole, Job, JobMetric, JobStatus, TriggerImage, utcnow
from app.storage import ArtifactStore
from app.webhooks import deliver_due, queue_webhook
from worker.sandbox import (Limits, ResourceLimitExceeded, SandboxError, TimeLimitExceeded,
                            run_sanitize_sandboxed)
from worker.sanitize.config import SanitizeConfig
from worker.sanitize.errors import Cancelled, InputError

log = logging.getLogger(__name__)

Sessions = sessionmaker[Session]

# The engine reports progress and asks about cancellation many times a second; the database
# hears about either at most this often (a new stage is always written).
DB_INTERVAL_S = 1.0
# Report sections whose numbers become job_metrics rows.
METRIC_SECTIONS = ("clean_accuracy", "recovered_asr", "timings_s", "sample_accuracy", "backdoor_probability")


@dataclass(frozen=True)
class Claim:
    """This process's right to run one attempt of a job."""

    job_id: uuid.UUID
    attempt: int
    worker_id: str

    def holds(self):
        """The SQL condition under which the job is still ours to write."""
        return (Job.id == self.job_id, Job.status == JobStatus.running, Job.attempts == self.attempt,
                Job.worker_id == self.worker_id)


class ClaimLost(Cancelled):
    """The job was given to another worker (the sweeper found our heartbeat stale): stop without
    writing anything. A Cancelled, so that it stops the engine the same way."""


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def work(sessions: Sessions, store: ArtifactStore, settings: Settings) -> None:
    """Runs queued jobs, oldest first, until interrupted, and sweeps now and then; any number of
    workers may share a database, since each job is claimed by an atomic update."""
    from worker.sweeper import try_sweep

    next_sweep = time.monotonic()
    while True:
        if time.monotonic() >= next_sweep:
            try_sweep(sessions, settings, announce=None)  # polled, a requeued job needs no message
            next_sweep = time.monotonic() + settings.sweep_interval_s
        try:
            with sessions() as session:
                job_id = session.scalar(select(Job.id).where(Job.status == JobStatus.queued)
                                        .order_by(Job.created_at).limit(1))
        except UNAVAILABLE as e:  # the database restarting, say: wait for it
            log.warning("cannot look for jobs: %s", str(e).splitlines()[0])
            job_id = None
        if job_id is None:
            time.sleep(settings.worker_poll_interval_s)
            continue
        try:
            run_job(sessions, store, settings, job_id)
        except UNAVAILABLE as e:  # for longer than db_retry_s: the sweeper settles the job later
            log.warning("job %s: the database stayed unavailable: %s", job_id, str(e).splitlines()[0])


def run_job(sessions: Sessions, store: ArtifactStore, settings: Settings,
            job_id: uuid.UUID) -> JobStatus | None:
    """Runs the job if it is still queued; returns its final status, or None if it was not
    queued (another worker took it, or it was cancelled or deleted) or was taken from us."""
    with job_context_from_db(sessions, job_id):  # every log line about it names the job and tenant
        job_claim = retry_while_unavailable(f"claiming job {job_id}", lambda: claim(sessions, job_id),
                                            settings.db_retry_s)
        if job_claim is None:
            return None
        return execute(sessions, store, settings, job_claim)


def claim(sessions: Sessions, job_id: uuid.UUID) -> Claim | None:
    worker_id, now = this_worker(), utcnow()
    with sessions() as session:
        attempt = session.scalar(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(status=JobStatus.running, attempts=Job.attempts + 1, worker_id=worker_id,
                    started_at=now, heartbeat_at=now, progress_message="starting")
            .returning(Job.attempts))
        session.commit()
    return Claim(job_id, attempt, worker_id) if attempt is not None else None


def execute(sessions: Sessions, store: ArtifactStore, settings: Settings, job_claim: Claim) -> JobStatus | None:
    """Runs a claimed job to its end and records the outcome on its row (None: the claim was
    lost on the way, and nothing was recorded)."""
    job_id = job_claim.job_id

    def read_job() -> tuple[SanitizeConfig, Artifact, Artifact]:
        with sessions() as session:
            job = session.get(Job, job_id)
            return (SanitizeConfig(**job.config), job.artifact(ArtifactRole.model),
                    job.artifact(ArtifactRole.samples))

    config, model, samples = retry_while_unavailable(f"reading job {job_id}", read_job, settings.db_retry_s)
    with JobTracker(sessions, job_claim, settings.heartbeat_interval_s) as tracker, \
            tempfile.TemporaryDirectory(prefix="baerase-job-") as out:
        try:
            report = run_sanitize_sandboxed(store.local_path(model.key), store.local_path(samples.key),
                                            Path(out), config, tracker.progress, tracker.check_cancel,
                                            job_limits(settings), settings.sandbox_required)
            status = store_results(sessions, store, settings, job_claim, Path(out), report, model)
        except ClaimLost:
            status = None
        except Cancelled:
            status = finish(sessions, settings, job_claim, JobStatus.cancelled)
        except InputError as e:
            status = finish(sessions, settings, job_claim, JobStatus.failed, "invalid_input", str(e))
        except (SoftTimeLimitExceeded, TimeLimitExceeded):  # Celery's, or the sandbox's own
            status = finish(sessions, settings, job_claim, JobStatus.failed, "time_limit",
                            f"the job ran longer than the workers' time limit "
                            f"({settings.job_soft_time_limit_s:.0f} s); ask the operator, or use a "
                            "smaller model, fewer samples or fewer steps")
        except ResourceLimitExceeded as e:
            status = finish(sessions, settings, job_claim, JobStatus.failed, "resource_limit",
                            f"{e}; ask the operator, or use a smaller model or fewer samples")
        except SandboxError as e:  # the engine's process crashed, or the sandbox is incomplete
            log.error("job %s failed: %s", job_id, e)
            status = finish(sessions, settings, job_claim, JobStatus.failed, "internal_error", str(e))
        except (KeyboardInterrupt, SystemExit):
            requeue(sessions, job_claim)
            raise
        except Exception as e:
            log.exception("job %s failed", job_id)
            status = finish(sessions, settings, job_claim, JobStatus.failed, "internal_error",
                            f"the worker failed ({type(e).__name__}); its log has the details")
    if status is None:
        log.warning("job %s was handed to another worker while this one ran it; result dropped", job_id)
        return None
    log.info("job %s %s (attempt %d)", job_id, status.value, job_claim.attempt)
    deliver_due(sessions, settings, job_id)  # its webhook, if any; the sweeper retries failures
    return status


def job_limits(settings: Settings) -> Limits:
    return Limits(wall_time_s=settings.job_soft_time_limit_s, cpu_time_s=settings.job_cpu_time_limit_s or None,
                  memory_bytes=settings.job_memory_limit_bytes or None)


class JobTracker:
    """The engine's progress and check_cancel callbacks, and the heartbeat, backed by the job's
    row. Used as a context manager: the heartbeat thread runs inside it."""

    def __init__(self, sessions: Sessions, job_claim: Claim, heartbeat_interval_s: float):
        self.sessions, self.claim, self.heartbeat_interval_s = sessions, job_claim, heartbeat_interval_s
        self.stage: str | None = None
        self.last_write = self.last_check = float("-inf")
        self.lost = threading.Event()
        self.stopped = threading.Event()
        self.heartbeat = threading.Thread(target=self.beat, name=f"heartbeat-{job_claim.job_id}", daemon=True)

    def __enter__(self) -> "JobTracker":
        self.heartbeat.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.heartbeat.join()

    def beat(self) -> None:
        # A thread, not the engine's callbacks: a single long step must not look like a dead worker.
        while not self.stopped.wait(self.heartbeat_interval_s):
            if not self.write(heartbeat_at=utcnow()):
                return

    def write(self, **values) -> bool:
        """Updates the job's row while the claim holds; False once it no longer does. A database
        that cannot be reached only skips this write: the next heartbeat or progress tries again."""
        try:
            with self.sessions() as session:
                written = session.execute(update(Job).where(*self.claim.holds()).values(**values))
                session.commit()
        except UNAVAILABLE as e:
            log.warning("job %s: could not update its row: %s", self.claim.job_id, str(e).splitlines()[0])
            return True
        if written.rowcount == 0:
            self.lost.set()
        return written.rowcount == 1

    def progress(self, stage: str, fraction: float, message: str) -> None:
        now = time.monotonic()
        if stage == self.stage and now - self.last_write < DB_INTERVAL_S:
            return
        self.stage, self.last_write = stage, now
        self.write(progress_stage=stage, progress_fraction=round(fraction, 4), progress_message=message[:500])

    def check_cancel(self) -> None:
        if self.lost.is_set():
            raise ClaimLost()
        now = time.monotonic()
        if now - self.last_check < DB_INTERVAL_S:
            return
        self.last_check = now
        try:
            with self.sessions() as session:
                requested = session.scalar(select(Job.cancel_requested).where(Job.id == self.claim.job_id))
        except UNAVAILABLE:
            return  # asked again in a second
        if requested is not False:  # None: the row is gone, so nobody wants the result
            raise Cancelled()


def store_results(sessions: Sessions, store: ArtifactStore, settings: Settings, job_claim: Claim,
                  out: Path, report: dict, model: Artifact) -> JobStatus | None:
    """Moves the sanitized model into the store and records report, metrics, trigger pictures,
    the final state and its webhook in one transaction (None: the claim was lost)."""
    job_id = job_claim.job_id
    suffix = Path(model.key).suffix
    staged = store.stage()
    try:
        staged.copy_from(out / f"model{suffix}")
        stored = store.put(staged, f"jobs/{job_id}/sanitized_model{suffix}")
    finally:
        staged.discard()
    scores = {(s["class"], s["family"]): s["log_ratio"] for s in report["class_scores"]}

    def record() -> bool:
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
        recorded = retry_while_unavailable(f"storing the results of job {job_id}", record, settings.db_retry_s)
    except BaseException:
        store.delete_prefix(stored.key)
        raise
    if not recorded:
        store.delete_prefix(stored.key)
        return None
    return JobStatus.succeeded


def recorded_before(session: Session, job_claim: Claim, status: JobStatus) -> bool:
    """Whether our own earlier try already committed this outcome (its answer was lost, so it
    was retried), rather than the job having been taken from us."""
    return session.scalar(select(Job.id).where(
        Job.id == job_claim.job_id, Job.status == status, Job.attempts == job_claim.attempt,
        Job.worker_id == job_claim.worker_id)) is not None


def report_metrics(report: dict) -> dict[str, float]:
    """The report's numbers by dotted path: clean_accuracy.after, recovered_asr.0.before, ..."""
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


def finish(sessions: Sessions, settings: Settings, job_claim: Claim, status: JobStatus,
           error_code: str | None = None, error_message: str | None = None) -> JobStatus | None:
    """Records a final state without results, and its webhook (None: the claim was lost)."""
    def record() -> bool:
        with sessions() as session:
            finished = session.execute(update(Job).where(*job_claim.holds()).values(
                status=status, finished_at=utcnow(), error_code=error_code, error_message=error_message))
            if finished.rowcount == 0:
                return recorded_before(session, job_claim, status)
            queue_webhook(session, job_claim.job_id)
            session.commit()
            return True

    recorded = retry_while_unavailable(f"marking job {job_claim.job_id} {status.value}", record, settings.db_retry_s)
    return status if recorded else None


def requeue(sessions: Sessions, job_claim: Claim) -> None:
    """Puts a job back in the queue when its worker is being stopped, so it runs again later;
    being stopped does not use up one of its attempts."""
    try:
        with sessions() as session:
            session.execute(update(Job).where(*job_claim.holds()).values(
                status=JobStatus.queued, attempts=Job.attempts - 1, worker_id=None, started_at=None,
                heartbeat_at=None, enqueued_at=utcnow(), progress_stage=None, progress_fraction=0.0,
                progress_message="requeued: the worker was stopped"))
            session.commit()
    except UNAVAILABLE:  # no time to wait while stopping: the sweeper requeues it later
        log.warning("job %s: could not requeue it; the sweeper will, once its heartbeat is stale",
                    job_claim.job_id)
