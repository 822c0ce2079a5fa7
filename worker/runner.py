"""Runs jobs: ``run_job`` runs one queued job by id (what the Celery task calls, see
worker/celery_worker.py); ``run_queued_jobs`` polls the database for queued jobs (the worker of
the embedded mode, and `baerase worker` without a broker, started by ``serve_polling``).

Each job is claimed first, and every write about it goes through app/core/lifecycle.py. While it
runs, a heartbeat thread stamps the job's row; the engine's progress and cancellation checks are
relayed to the row at most once a second. The engine runs in a sandboxed child process
(worker/sandbox.py), which enforces the job's wall-time, CPU-time and memory limits; this module
turns how that ended into the job's final state. A job whose model came from MLflow has its
sanitized model registered there first (app/core/mlflow_models.py), and the outcome written with
the result: registering never fails the job. It imports no torch.
"""

import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from app.core import lifecycle
from app.core.config import Settings
from app.core.db import UNAVAILABLE, Sessions, make_engine, make_sessions, retry_while_unavailable
from app.core.lifecycle import Claim
from app.core.logging_setup import job_context
from app.core.mlflow_models import is_mlflow_uri, register_sanitized
from app.core.models import JobStatus, utcnow
from app.core.storage import ArtifactStore, make_artifact_store
from app.core.webhooks import deliver_due
from worker.sandbox import (Limits, ResourceLimitExceeded, SandboxError, TimeLimitExceeded,
                            run_sanitize_sandboxed)
from worker.sanitize.config import SanitizeConfig
from worker.sanitize.errors import Cancelled, InputError

log = logging.getLogger(__name__)

# The engine reports progress and asks about cancellation many times a second; the database
# hears about either at most this often (a new stage is always written).
DB_INTERVAL_S = 1.0


class ClaimLost(Cancelled):
    """The job was given to another worker (the sweeper found our heartbeat stale): stop without
    writing anything. A Cancelled, so that it stops the engine the same way."""


def serve_polling(settings: Settings, device: str | None) -> None:
    """`baerase worker` without a broker: ``run_queued_jobs`` until SIGTERM or Ctrl-C, which put a
    running job back in the queue. ``device``: a CUDA_VISIBLE_DEVICES value to pin the engine to."""
    if device is not None:  # before the engine is imported: CUDA reads it once
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds like Ctrl-C: requeue, stop
    try:
        run_queued_jobs(make_sessions(make_engine(settings.database_url)), make_artifact_store(settings), settings)
    except KeyboardInterrupt:
        pass


def run_queued_jobs(sessions: Sessions, store: ArtifactStore, settings: Settings) -> None:
    """Runs queued jobs, oldest first, until interrupted, and sweeps now and then; any number of
    workers may share a database, since each job is claimed by an atomic update."""
    from worker.sweeper import try_sweep

    next_sweep = time.monotonic()
    while True:
        if time.monotonic() >= next_sweep:
            try_sweep(sessions, store, settings, announce=None)  # polled, a requeued job needs no message
            next_sweep = time.monotonic() + settings.sweep_interval_s
        try:
            job_id = lifecycle.oldest_queued(sessions)
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
    with job_context(job_id, tenant_for_logs(sessions, job_id)):  # every log line names job and tenant
        job_claim = retry_while_unavailable(f"claiming job {job_id}", lambda: lifecycle.claim(sessions, job_id),
                                            settings.db_retry_s)
        if job_claim is None:
            return None
        return execute(sessions, store, settings, job_claim)


def tenant_for_logs(sessions: Sessions, job_id: uuid.UUID) -> str | None:
    try:
        return lifecycle.tenant_name(sessions, job_id)
    except Exception:  # a log field must never stop a job
        return None


def execute(sessions: Sessions, store: ArtifactStore, settings: Settings, job_claim: Claim) -> JobStatus | None:
    """Runs a claimed job to its end and records the outcome on its row (None: the claim was
    lost on the way, and nothing was recorded)."""
    job_id = job_claim.job_id
    config, model, samples, model_source = retry_while_unavailable(
        f"reading job {job_id}", lambda: lifecycle.job_inputs(sessions, job_id), settings.db_retry_s)

    def fail(code: str, message: str) -> JobStatus | None:
        return lifecycle.finish(sessions, settings, job_claim, JobStatus.failed, code, message)

    with JobTracker(sessions, job_claim, settings.heartbeat_interval_s) as tracker, \
            tempfile.TemporaryDirectory(prefix="baerase-job-") as out:
        try:
            # A remote store downloads the inputs here, and removes the copies once the job ends.
            with store.local_copy(model.key) as model_path, store.local_copy(samples.key) as samples_path:
                report = run_sanitize_sandboxed(model_path, samples_path, Path(out), SanitizeConfig(**config),
                                                tracker.progress, tracker.check_cancel, job_limits(settings),
                                                settings.sandbox_required)
            registration = None
            if is_mlflow_uri(model_source):
                tracker.progress("report", 1.0, "registering the sanitized model in MLflow")
                registration = register_sanitized(settings, model_source, job_id, Path(out),
                                                  Path(out) / report.model_file, report)
            status = lifecycle.succeed(sessions, store, settings, job_claim, Path(out), report, model, registration)
        except ClaimLost:
            status = None
        except Cancelled:
            status = lifecycle.finish(sessions, settings, job_claim, JobStatus.cancelled)
        except InputError as e:
            status = fail("invalid_input", str(e))
        except (SoftTimeLimitExceeded, TimeLimitExceeded):  # Celery's, or the sandbox's own
            status = fail("time_limit", f"the job ran longer than the workers' time limit "
                                        f"({settings.job_soft_time_limit_s:.0f} s); ask the operator, or "
                                        "use a smaller model, fewer samples or fewer steps")
        except ResourceLimitExceeded as e:
            status = fail("resource_limit", f"{e}; ask the operator, or use a smaller model or fewer samples")
        except SandboxError as e:  # the engine's process crashed, or the sandbox is incomplete
            log.error("job %s failed: %s", job_id, e)
            status = fail("internal_error", str(e))
        except (KeyboardInterrupt, SystemExit):
            lifecycle.requeue(sessions, job_claim)
            raise
        except Exception as e:
            log.exception("job %s failed", job_id)
            status = fail("internal_error", f"the worker failed ({type(e).__name__}); its log has the details")
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
            holds = lifecycle.update_claimed(self.sessions, self.claim, **values)
        except UNAVAILABLE as e:
            log.warning("job %s: could not update its row: %s", self.claim.job_id, str(e).splitlines()[0])
            return True
        if not holds:
            self.lost.set()
        return holds

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
            requested = lifecycle.cancel_requested(self.sessions, self.claim.job_id)
        except UNAVAILABLE:
            return  # asked again in a second
        if requested:
            raise Cancelled()
