"""The sweeper: puts the jobs table right after the failures that happen in a fleet.

- A running job whose heartbeat is older than ``heartbeat_timeout_s`` has lost its worker
  (killed, out of memory, host gone): it is queued again (and announced) while it has attempts
  left, failed with ``worker_lost`` once it has used ``job_max_attempts``, and cancelled if a
  cancel was asked for.
- A queued job that has waited longer than ``resend_queued_after_s`` since its last message is
  announced again: the broker may have lost the message (Redis restarted). A duplicate message is
  harmless, since only one claim of a queued job can succeed.
- Webhook deliveries that are due are attempted (app/webhooks.py).

Every change is a conditional update, so any number of sweepers may run at once: each Celery
`baerase worker` runs one in a process of its own (``sweep_forever``), and the polling worker
sweeps between jobs.
"""

import logging
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import and_, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db import UNAVAILABLE
from app.models import Job, JobStatus, utcnow
from app.webhooks import deliver_due, queue_webhook

log = logging.getLogger(__name__)

Sessions = sessionmaker[Session]
Announce = Callable[[uuid.UUID], bool]


def sweep(sessions: Sessions, settings: Settings, announce: Announce | None) -> None:
    """One round. ``announce`` sends a job's message (None: workers poll, nothing to send)."""
    for job_id in recover_lost_jobs(sessions, settings):
        if announce:
            announce(job_id)
    if announce:
        for job_id in take_waiting_jobs(sessions, settings):
            announce(job_id)
    deliver_due(sessions, settings)


def try_sweep(sessions: Sessions, settings: Settings, announce: Announce | None) -> None:
    """One round that never raises: a sweeper that died would leave lost jobs running forever."""
    try:
        sweep(sessions, settings, announce)
    except UNAVAILABLE as e:
        log.warning("the database is unavailable (%s); sweeping again later", str(e).splitlines()[0])
    except Exception:
        log.exception("sweeping failed; trying again later")


def recover_lost_jobs(sessions: Sessions, settings: Settings) -> list[uuid.UUID]:
    """Settles the running jobs whose worker is gone; returns those queued again."""
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
            update(Job).where(lost)
            .values(status=JobStatus.queued, worker_id=None, started_at=None, heartbeat_at=None,
                    enqueued_at=now, progress_stage=None, progress_fraction=0.0,
                    progress_message="requeued: its worker stopped responding")
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


def sweep_forever() -> None:
    """The sweeper process next to each Celery worker (see worker/tasks.py): settings from the
    environment, a round every sweep_interval_s, until the worker stops it."""
    from celery.platforms import set_pdeathsig

    from app.db import make_engine, make_sessions
    from worker.celery_app import JobQueue

    set_pdeathsig("SIGTERM")  # dies with its worker, even one killed with SIGKILL
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sweeper %(levelname)s %(message)s")
    settings = Settings()
    sessions, queue = make_sessions(make_engine(settings.database_url)), JobQueue(settings)
    while True:
        try_sweep(sessions, settings, queue.announce)
        time.sleep(settings.sweep_interval_s)
