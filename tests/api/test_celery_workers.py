"""Production mode with real processes: the API (in this process) on PostgreSQL queues jobs on a
Redis of the test's own, and separate `baerase worker` processes (Celery) run them. Jobs survive
a worker killed with SIGKILL and a Redis restart, can be cancelled mid-run, run exactly once
with two workers, and report to a webhook with a Standard Webhooks signature."""

import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
import redis
from sqlalchemy import select

from app.core.config import Settings
from app.core.models import Job
from tests.api.support import free_port, wait_for
from app.core.job_queue import QUEUE

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)

FAST = {"recovery": {"screen_steps": 5, "refine_steps": 5, "generator_steps": 5, "families": ["patch"]},
        "unlearning": {"epochs": 1, "rounds": 1}}
# Long enough to be caught in its recovery stage: several seconds of it.
SLOW = {"recovery": {"screen_steps": 400, "converged_after": 20000, "families": ["mask"]}, "unlearning": {"epochs": 1}}
# Short intervals so that the tests do not wait long; the heartbeat timeout still leaves room
# for a loaded machine to delay a heartbeat or two.
TIMINGS = {"heartbeat_interval_s": 1, "heartbeat_timeout_s": 10, "sweep_interval_s": 0.5,
           "resend_queued_after_s": 3, "webhook_retry_base_s": 0.5}
# The webhook receiver listens on 127.0.0.1, which webhooks reach only where the operator allows it.
LOCAL_WEBHOOKS = {"webhook_allowed_hosts": "127.0.0.1"}


class RedisServer:
    """A Redis of this test's own, that keeps nothing on disk: a restart loses every message."""

    def __init__(self, directory: Path):
        self.port, self.directory = free_port(), directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        wait_for(lambda: self.responds(client), "redis-server")
        client.close()

    @staticmethod
    def responds(client: redis.Redis) -> bool:
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()

    def waiting_messages(self) -> int:
        with redis.Redis(port=self.port) as client:
            return client.llen(QUEUE)


@pytest.fixture
def broker(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def settings(database_url, tmp_path, broker) -> Settings:
    return Settings(_env_file=None, database_url=database_url, data_dir=tmp_path / "data", api_key=None,
                    broker_url=broker.url, **TIMINGS, **LOCAL_WEBHOOKS)


class Workers:
    """`baerase worker` processes, each in a process group of its own (the Celery parent and its
    pool process), with their logs."""

    def __init__(self, settings: Settings, directory: Path):
        self.directory, self.processes, self.logs = directory, [], []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BAERASE_")} | {
            "PYTHONPATH": str(REPO), "BAERASE_DATABASE_URL": settings.database_url,
            "BAERASE_BROKER_URL": settings.broker_url, "BAERASE_ARTIFACT_DIR": str(settings.artifact_dir),
            **{f"BAERASE_{name.upper()}": str(value) for name, value in (TIMINGS | LOCAL_WEBHOOKS).items()}}

    def start(self) -> subprocess.Popen:
        log = self.directory / f"worker{len(self.processes)}.log"
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--device", "cpu"], cwd=REPO,
                                   env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        self.logs.append(log)
        return process

    def kill(self, process: subprocess.Popen) -> None:
        """What a crashed host does: every process of the worker dies at once, mid-job."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def log_text(self) -> str:
        return "\n".join(log.read_text() for log in self.logs)

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # idle now: Celery's warm shutdown is quick
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def workers(settings, tmp_path):
    workers = Workers(settings, tmp_path)
    yield workers
    workers.stop_all()


def job_now(client, auth, job: dict) -> dict:
    return client.get(job["links"]["self"], headers=auth).json()


def wait_until_finished(client, auth, job: dict, workers: Workers) -> dict:
    def finished():
        now = job_now(client, auth, job)
        return now if now["status"] not in ("queued", "running") else None

    return wait_for(finished, f"job {job['id']} to finish; worker logs:\n{workers.log_text()}")


def wait_until_recovering(client, auth, job: dict) -> None:
    def recovering():
        now = job_now(client, auth, job)
        assert now["status"] in ("queued", "running"), now
        return now["progress"]["stage"] == "recovery"

    wait_for(recovering, f"job {job['id']} to reach its recovery stage")


def test_a_job_runs_end_to_end_and_its_webhook_is_signed(client, submit, auth, workers, webhook_receiver):
    submitted = int(time.time())
    job = submit(config=FAST | {"webhook_url": webhook_receiver.url}).json()
    worker = workers.start()

    done = wait_until_finished(client, auth, job, workers)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert client.get(job["links"]["model"], headers=auth).status_code == 200

    request = wait_for(lambda: webhook_receiver.requests, "the webhook")[0]
    received = time.time()
    # Verified as a receiver would, from the spec rather than from the service's code.
    secret = client.get("/webhook-secret", headers=auth).json()["secret"]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    message_id, timestamp = request.headers["webhook-id"], request.headers["webhook-timestamp"]
    expected = base64.b64encode(hmac.new(key, f"{message_id}.{timestamp}.".encode() + request.body,
                                         hashlib.sha256).digest()).decode()
    assert f"v1,{expected}" in request.headers["webhook-signature"].split(" ")
    # Unix seconds (not milliseconds), stamped while the job ran: an ordering, not a speed.
    assert submitted <= int(timestamp) <= received
    event = json.loads(request.body)
    assert event["type"] == "job.succeeded" and event["data"]["id"] == job["id"]
    assert event["data"]["status"] == "succeeded" and event["timestamp"] == done["finished_at"]

    deliveries = client.get(job["links"]["webhooks"], headers=auth).json()["deliveries"]
    assert [(d["message_id"], d["status"], d["attempts"], d["last_status_code"]) for d in deliveries] == [
        (message_id, "delivered", 1, 204)]

    # The Celery parent took the message and supervised; only its pool process loaded the engine.
    assert "libtorch" not in Path(f"/proc/{worker.pid}/maps").read_text()


def test_a_job_whose_worker_is_killed_finishes_on_another(client, submit, auth, workers, sessions):
    job = submit(config=SLOW).json()
    first = workers.start()
    wait_until_recovering(client, auth, job)
    workers.kill(first)
    assert job_now(client, auth, job)["status"] == "running"  # as the dead worker left it

    workers.start()  # its sweeper finds the stale heartbeat and queues the job again
    done = wait_until_finished(client, auth, job, workers)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    with sessions() as session:
        worker_id = session.scalar(select(Job.worker_id).where(Job.id == UUID(job["id"])))
    assert worker_id and not worker_id.endswith(f":{first.pid}")


def test_a_running_job_is_cancelled(client, submit, auth, workers):
    job = submit(config=SLOW).json()
    workers.start()
    wait_until_recovering(client, auth, job)
    assert client.post(job["links"]["cancel"], headers=auth).status_code == 202

    done = wait_until_finished(client, auth, job, workers)
    assert done["status"] == "cancelled" and done["result"] is None and done["attempts"] == 1


def test_two_workers_run_each_job_exactly_once(client, submit, auth, workers):
    jobs = [submit(config=FAST).json() for _ in range(3)]
    workers.start()
    workers.start()

    for job in jobs:
        done = wait_until_finished(client, auth, job, workers)
        assert done["status"] == "succeeded" and done["attempts"] == 1, (done, workers.log_text())
    # Messages may be sent twice (the sweeper re-sends those that wait long); runs may not be.
    log = workers.log_text()
    for job in jobs:
        assert log.count(f"job {job['id']} succeeded") == 1, log


def test_jobs_whose_messages_redis_lost_are_sent_again(client, submit, auth, workers, broker):
    jobs = [submit(config=FAST).json() for _ in range(2)]
    assert broker.waiting_messages() == 2
    broker.stop()
    broker.start()
    assert broker.waiting_messages() == 0  # a restart without persistence: the messages are gone

    workers.start()  # its sweeper sends the waiting jobs' messages again
    for job in jobs:
        done = wait_until_finished(client, auth, job, workers)
        assert done["status"] == "succeeded" and done["attempts"] == 1, done


def test_a_job_submitted_while_the_broker_is_down_runs_once_it_is_back(client, submit, auth, workers, broker):
    broker.stop()
    job = submit(config=FAST).json()  # accepted and kept; its message could not be sent
    broker.start()
    # The long resend timer is far away: only the job's not-announced mark gets it sent.
    workers.env["BAERASE_RESEND_QUEUED_AFTER_S"] = "3600"
    workers.start()
    done = wait_until_finished(client, auth, job, workers)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done


def test_a_worker_stopped_with_sigterm_hands_its_job_back_at_once(client, submit, auth, workers):
    # A heartbeat timeout far away: only the hand-back can put the job back in the queue.
    workers.env["BAERASE_HEARTBEAT_TIMEOUT_S"] = "3600"
    job = submit(config=SLOW).json()
    first = workers.start()
    wait_until_recovering(client, auth, job)
    os.kill(first.pid, signal.SIGTERM)  # what `docker stop` sends the worker's main process

    def handed_back():
        now = job_now(client, auth, job)
        return now if now["status"] == "queued" else None

    queued = wait_for(handed_back, f"job {job['id']} to be queued again; logs:\n{workers.log_text()}")
    assert queued["attempts"] == 0, queued  # being stopped is not a failed attempt
    first.wait(timeout=60)

    workers.start()
    done = wait_until_finished(client, auth, job, workers)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
