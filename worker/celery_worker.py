"""The Celery worker (`baerase worker` with BAERASE_BROKER_URL set): its app, its one task, and
``serve``, which runs it with one pool process per device and a sweeper process beside it.

The parent process only takes messages and supervises. The task imports the engine (torch)
inside the pool process that runs the job, after that process has been pinned to its device, and
that process exits after the job (worker_max_tasks_per_child=1): CUDA is never initialised in the
parent, and every job starts with a clean GPU.

A worker told to stop (SIGTERM: a deploy, autoscaling) hands its running jobs back at once instead
of letting Celery wait for them: ``hand_back_running_jobs``.
"""

import logging
import multiprocessing
import os
import signal
import uuid
from functools import cache

import billiard
from celery.signals import worker_process_init, worker_shutting_down
from celery.utils.log import current_process_index

from app.core.config import Settings
from app.core.db import make_engine, make_sessions
from app.core.job_queue import QUEUE, RUN_JOB_TASK, make_celery
from app.core.storage import make_artifact_store
from worker.runner import run_job
from worker.sweeper import sweep_forever

log = logging.getLogger(__name__)

settings = Settings()
celery = make_celery(settings)


@celery.task(name=RUN_JOB_TASK)
def run_job_task(job_id: str) -> None:
    sessions, store = job_runtime()
    run_job(sessions, store, settings, uuid.UUID(job_id))


@cache
def job_runtime():
    """This pool process's database engine and artifact store, made in it: database connections
    must not be shared across a fork."""
    return make_sessions(make_engine(settings.database_url)), make_artifact_store(settings)


def serve(devices: list[str]) -> None:
    """Runs the worker until it is stopped: one pool process per entry of ``devices`` (values for
    CUDA_VISIBLE_DEVICES, see worker/devices.py), each running one job at a time."""
    def pin_device(**_):
        device = devices[current_process_index(base=0)]
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        log.info("pool process %d runs jobs on %s", os.getpid(), f"GPU {device}" if device else "the CPU")

    worker_process_init.connect(pin_device, weak=False)
    worker_shutting_down.connect(hand_back_running_jobs, weak=False)
    # A process of its own, not a thread here: a pool process forked while such a thread held a
    # lock or a database connection would inherit them in that state.
    sweeper = multiprocessing.get_context("spawn").Process(target=sweep_forever, name="baerase-sweeper",
                                                           daemon=True)
    sweeper.start()
    try:
        celery.worker_main(["worker", "--pool=prefork", f"--concurrency={len(devices)}", "--loglevel=INFO",
                            f"--queues={QUEUE}", f"--hostname=baerase-{os.getpid()}@%h",
                            # Nothing to learn from other workers: the database coordinates.
                            "--without-gossip", "--without-mingle"])
    finally:
        sweeper.terminate()
        sweeper.join()


def hand_back_running_jobs(**_) -> None:
    """On a warm shutdown Celery waits for the running jobs, which may take hours (and a container
    is killed long before). Each pool process is told to stop instead: the SIGTERM raises
    SystemExit in it (billiard's handler), and the runner puts its job back in the queue, the
    attempt not counted (worker/runner.py); a sweeper sends its message to another worker."""
    for process in billiard.active_children():
        log.info("stopping: handing back the job of pool process %d, if any", process.pid)
        os.kill(process.pid, signal.SIGTERM)
