"""The broker: Celery configured from settings for long GPU jobs, as Celery's docs advise. The API
and the sweepers send messages through ``JobQueue``; the worker's app and task are in
worker/celery_worker.py.

A message only says "job X is ready": the jobs table holds the state, and the claim
(app/core/lifecycle.py) decides who runs a job. So a lost message is sent again by a sweeper, and a
duplicate one finds the job already claimed and does nothing.
"""

import logging
import uuid

from celery import Celery

from app.core.config import Settings

log = logging.getLogger(__name__)

RUN_JOB_TASK = "baerase.run_job"
QUEUE = "baerase"
# Publishing gives up after this many reconnection tries (spaced 0.5 s apart): the caller is an
# API request or a sweep, and a sweeper sends the message again later.
PUBLISH_RETRIES = 3


def make_celery(settings: Settings) -> Celery:
    celery = Celery("baerase", broker=settings.broker_url, set_as_current=False)
    celery.conf.update(
        task_default_queue=QUEUE,
        # Messages are JSON, never pickles: whoever can write to the broker must not be able to
        # run code in the workers.
        task_serializer="json", accept_content=["json"],
        # Outcomes go to the jobs table, not to a result backend.
        task_ignore_result=True,
        # Acknowledge a message once its job has run, not when it is received, so that a worker
        # that dies mid-job does not lose it...
        task_acks_late=True,
        # ...but Redis delivers an unacknowledged message again after the visibility timeout: it
        # must outlast the longest job (the hard limit), or a second worker gets a running job's
        # message.
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
        # A job whose pool process died is requeued by the sweeper, which counts the attempt;
        # rejecting its message here would only add a duplicate.
        task_reject_on_worker_lost=False,
        # One message reserved per pool process: a job waiting behind a long one stays in the
        # queue, where an idle worker can take it.
        worker_prefetch_multiplier=1,
        # A fresh process for every job: GPU memory and CUDA state never outlive a job, and the
        # parent, which never imports the engine, never initialises CUDA.
        worker_max_tasks_per_child=1,
        # Soft: the job fails cleanly (time_limit). Hard: the process is killed.
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_time_limit_s,
        # A running job keeps running when the broker connection drops (its result goes to the
        # database, and its claim keeps others off it).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
    )
    return celery


class JobQueue:
    """Sends "job X is ready" messages."""

    def __init__(self, settings: Settings):
        self.celery = make_celery(settings)

    def announce(self, job_id: uuid.UUID) -> bool:
        """Sends the job's message; False (logged) if the broker cannot be reached, in which case
        a sweeper sends it at its next round (the job stays not announced)."""
        try:
            self.celery.send_task(RUN_JOB_TASK, args=[str(job_id)], retry_policy={
                "max_retries": PUBLISH_RETRIES, "interval_start": 0.5, "interval_step": 0, "interval_max": 0.5})
        except Exception as e:  # kombu raises transport-specific errors
            log.warning("job %s: could not send its message (%s: %s); a sweeper will send it again",
                        job_id, type(e).__name__, e)
            return False
        return True
