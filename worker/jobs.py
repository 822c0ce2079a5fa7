"""Running jobs from the database: claim a queued job, run the engine on its files, store what it
made. ``run_job`` runs one job by id (what a queue worker calls); ``work`` polls the database for
queued jobs (the embedded mode's worker and `baerase worker`).

This module uses the database but does not import torch itself: the engine (which imports no
web, queue or database code) is imported when the first job runs.
"""

import logging
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.models import Artifact, ArtifactRole, Job, JobMetric, JobStatus, TriggerImage, utcnow
from app.schemas import job_view
from app.storage import ArtifactStore
from worker.sanitize.config import SanitizeConfig
from worker.sanitize.errors import Cancelled, InputError

log = logging.getLogger(__name__)

Sessions = sessionmaker[Session]

# The engine reports progress and asks about cancellation many times a second; the database
# hears about either at most this often (a new stage is always written).
DB_INTERVAL_S = 1.0
# Report sections whose numbers become job_metrics rows.
METRIC_SECTIONS = ("clean_accuracy", "recovered_asr", "timings_s", "sample_accuracy")


def work(sessions: Sessions, store: ArtifactStore, poll_interval_s: float) -> None:
    """Runs queued jobs, oldest first, until interrupted; any number of workers may share a
    database, since each job is claimed by an atomic update."""
    while True:
        try:
            with sessions() as session:
                job_id = session.scalar(select(Job.id).where(Job.status == JobStatus.queued)
                                        .order_by(Job.created_at).limit(1))
        except OperationalError as e:  # the database restarting, say: wait for it
            log.warning("cannot look for jobs: %s", str(e).splitlines()[0])
            job_id = None
        if job_id is None:
            time.sleep(poll_interval_s)
        else:
            run_job(sessions, store, job_id)


def run_job(sessions: Sessions, store: ArtifactStore, job_id: uuid.UUID) -> JobStatus | None:
    """Runs the job if it is still queued; returns its final status, or None if it was not
    queued (another worker took it, or it was cancelled or deleted)."""
    if not claim(sessions, job_id):
        return None
    return execute(sessions, store, job_id)


def claim(sessions: Sessions, job_id: uuid.UUID) -> bool:
    with sessions() as session:
        claimed = session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(status=JobStatus.running, started_at=utcnow(), progress_message="starting"))
        session.commit()
    return claimed.rowcount == 1


def execute(sessions: Sessions, store: ArtifactStore, job_id: uuid.UUID) -> JobStatus:
    """Runs a claimed (running) job to its end and records the outcome on its row."""
    from worker.sanitize.pipeline import sanitize

    with sessions() as session:
        job = session.get(Job, job_id)
        config = SanitizeConfig(**job.config)
        model, samples = job.artifact(ArtifactRole.model), job.artifact(ArtifactRole.samples)
    tracker = JobTracker(sessions, job_id)
    with tempfile.TemporaryDirectory(prefix="baerase-job-") as out:
        try:
            report = sanitize(store.local_path(model.key), store.local_path(samples.key), Path(out),
                              config, tracker.progress, tracker.check_cancel)
            status = store_results(sessions, store, job_id, Path(out), report, model)
        except Cancelled:
            status = finish(sessions, job_id, JobStatus.cancelled)
        except InputError as e:
            status = finish(sessions, job_id, JobStatus.failed, "invalid_input", str(e))
        except (KeyboardInterrupt, SystemExit):
            requeue(sessions, job_id)
            raise
        except Exception as e:
            log.exception("job %s failed", job_id)
            status = finish(sessions, job_id, JobStatus.failed, "internal_error",
                            f"the worker failed ({type(e).__name__}); its log has the details")
    log.info("job %s %s", job_id, status.value)
    notify_webhook(sessions, job_id)
    return status


class JobTracker:
    """The engine's progress and check_cancel callbacks, backed by the job's row."""

    def __init__(self, sessions: Sessions, job_id: uuid.UUID):
        self.sessions, self.job_id = sessions, job_id
        self.stage: str | None = None
        self.last_write = self.last_check = float("-inf")

    def progress(self, stage: str, fraction: float, message: str) -> None:
        now = time.monotonic()
        if stage == self.stage and now - self.last_write < DB_INTERVAL_S:
            return
        self.stage, self.last_write = stage, now
        with self.sessions() as session:
            session.execute(update(Job).where(Job.id == self.job_id).values(
                progress_stage=stage, progress_fraction=round(fraction, 4), progress_message=message[:500]))
            session.commit()

    def check_cancel(self) -> None:
        now = time.monotonic()
        if now - self.last_check < DB_INTERVAL_S:
            return
        self.last_check = now
        with self.sessions() as session:
            requested = session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id))
        if requested is not False:  # None: the row is gone, so nobody wants the result
            raise Cancelled()


def store_results(sessions: Sessions, store: ArtifactStore, job_id: uuid.UUID, out: Path,
                  report: dict, model: Artifact) -> JobStatus:
    """Moves the sanitized model into the store and records report, metrics and trigger
    pictures in one transaction."""
    suffix = Path(model.key).suffix
    staged = store.stage()
    try:
        staged.copy_from(out / f"model{suffix}")
        stored = store.put(staged, f"jobs/{job_id}/sanitized_model{suffix}")
    finally:
        staged.discard()
    scores = {(s["class"], s["family"]): s["anomaly_index"] for s in report["class_scores"]}
    with sessions() as session:
        try:
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
            session.execute(update(Job).where(Job.id == job_id).values(
                status=JobStatus.succeeded, finished_at=utcnow(), progress_stage="report",
                progress_fraction=1.0, progress_message="done",
                backdoor_detected=report["backdoor_detected"],
                detected_targets=report["detected_targets"], report=report))
            session.commit()
        except BaseException:
            session.rollback()
            store.delete_prefix(stored.key)
            raise
    return JobStatus.succeeded


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


def finish(sessions: Sessions, job_id: uuid.UUID, status: JobStatus, error_code: str | None = None,
           error_message: str | None = None) -> JobStatus:
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            status=status, finished_at=utcnow(), error_code=error_code, error_message=error_message))
        session.commit()
    return status


def requeue(sessions: Sessions, job_id: uuid.UUID) -> None:
    """Puts a job back in the queue when its worker is being stopped, so it runs again later."""
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.running).values(
            status=JobStatus.queued, started_at=None, progress_stage=None, progress_fraction=0.0,
            progress_message="requeued: the worker was stopped"))
        session.commit()


def notify_webhook(sessions: Sessions, job_id: uuid.UUID) -> None:
    """Posts the finished job to its webhook_url, once, best effort."""
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None or not job.webhook_url:
            return
        url, payload = job.webhook_url, job_view(job).model_dump(mode="json")
    try:
        httpx.post(url, json=payload, timeout=10, headers={"User-Agent": "baerase-webhook"}).raise_for_status()
    except httpx.HTTPError as e:
        log.warning("job %s: webhook %s failed: %s", job_id, url, e)
