"""The sweeper: puts the jobs table right after the failures that happen in a fleet.

- A running job whose heartbeat is older than ``heartbeat_timeout_s`` has lost its worker
  (killed, out of memory, host gone): it is queued again (and announced) while it has attempts
  left, failed with ``worker_lost`` once it has used ``job_max_attempts``, and cancelled if a
  cancel was asked for.
- A queued job whose message never reached the broker (it was down at submit, or the job was
  handed back by a stopping worker) is announced at the next sweep; one that has waited longer
  than ``resend_queued_after_s`` since its last message is announced again: the broker may have
  lost the message (Redis restarted). A duplicate message is harmless, since only one claim of a
  queued job can succeed.
- Webhook deliveries that are due are attempted (app/core/webhooks.py).
- Retention: the files of jobs finished more than ``artifact_retention_days`` ago are deleted, and
  Idempotency-Keys older than ``idempotency_retention_hours`` forgotten.

The state changes themselves are app/core/lifecycle.py's. Every change is a conditional update,
so any number of sweepers may run at once: each Celery
`baerase worker` runs one in a process of its own (``sweep_forever``), and the polling worker
sweeps between jobs.
"""

import logging
import time
import uuid
from collections.abc import Callable

from app.core.config import Settings
from app.core.db import UNAVAILABLE, Sessions
from app.core.lifecycle import (expire_finished_jobs, expire_idempotency_records, mark_announced, recover_lost_jobs,
                                take_waiting_jobs)
from app.core.storage import ArtifactStore
from app.core.webhooks import deliver_due

log = logging.getLogger(__name__)

Announce = Callable[[uuid.UUID], bool]


def sweep(sessions: Sessions, store: ArtifactStore, settings: Settings, announce: Announce | None) -> None:
    """One round. ``announce`` sends a job's message (None: workers poll, nothing to send)."""
    requeued = recover_lost_jobs(sessions, settings)
    if announce:
        announce_all(sessions, announce, [*requeued, *take_waiting_jobs(sessions, settings)])
    deliver_due(sessions, settings)
    expire_finished_jobs(sessions, store, settings)
    expire_idempotency_records(sessions, settings)


def announce_all(sessions: Sessions, announce: Announce, job_ids: list[uuid.UUID]) -> None:
    """Sends the jobs' messages in order, recording each that gets through. The first failure
    ends the round (the broker is down: each further try would wait out its retries); the rest
    stay not announced, for the next round."""
    for job_id in job_ids:
        if not announce(job_id):
            return
        mark_announced(sessions, job_id)


def try_sweep(sessions: Sessions, store: ArtifactStore, settings: Settings, announce: Announce | None) -> None:
    """One round that never raises: a sweeper that died would leave lost jobs running forever."""
    try:
        sweep(sessions, store, settings, announce)
    except UNAVAILABLE as e:
        log.warning("the database is unavailable (%s); sweeping again later", str(e).splitlines()[0])
    except Exception:
        log.exception("sweeping failed; trying again later")


def sweep_forever() -> None:
    """The sweeper process next to each Celery worker (see worker/celery_worker.py): settings from the
    environment, a round every sweep_interval_s, until the worker stops it."""
    from celery.platforms import set_pdeathsig

    from app.core.db import make_engine, make_sessions
    from app.core.job_queue import JobQueue
    from app.core.storage import make_artifact_store

    set_pdeathsig("SIGTERM")  # dies with its worker, even one killed with SIGKILL
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sweeper %(levelname)s %(message)s")
    settings = Settings()
    sessions, queue = make_sessions(make_engine(settings.database_url)), JobQueue(settings)
    store = make_artifact_store(settings)
    while True:
        try_sweep(sessions, store, settings, queue.announce)
        time.sleep(settings.sweep_interval_s)
