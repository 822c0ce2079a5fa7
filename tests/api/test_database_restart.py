"""PostgreSQL restarted while a job runs: a server of this test's own (its own cluster on another
port) is stopped and started again mid-job. The worker's heartbeat and progress writes and its
final write wait for it (pool pre-ping, retries), the job succeeds, and the API answers again."""

import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from uuid import UUID

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import upgrade
from app.main import create_app
from tests.api.support import PATIENCE_S, free_port, wait_for
from worker.runner import run_job

# Long enough to be caught in its recovery stage: several seconds of it.
SLOW = {"recovery": {"screen_steps": 400, "converged_after": 20000, "families": ["mask"]}, "unlearning": {"epochs": 1}}

pytestmark = pytest.mark.skipif(shutil.which("initdb") is None or shutil.which("runuser") is None,
                                reason="needs PostgreSQL's initdb and pg_ctl, run as the postgres user")


class PostgresServer:
    """A throwaway cluster owned by the postgres user (the server refuses to run as root)."""

    def __init__(self):
        self.directory = Path(tempfile.mkdtemp(prefix="baerase-pg-"))
        shutil.chown(self.directory, "postgres", "postgres")
        self.data, self.port = self.directory / "data", free_port()
        self.as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def as_postgres(self, *command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True,
                       timeout=PATIENCE_S)

    def start(self) -> None:
        self.as_postgres("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.directory / "log"), "-o",
                         f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self.as_postgres("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def remove(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", "pg_ctl", "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def postgres():
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def settings(postgres, tmp_path):
    upgrade(postgres.url)
    # Short intervals: a heartbeat or two falls in the outage, and writes retry every few seconds.
    return Settings(_env_file=None, database_url=postgres.url, data_dir=tmp_path / "data", api_key=None,
                    status_cache_s=0, heartbeat_interval_s=1, heartbeat_timeout_s=60)


def test_a_job_survives_a_postgresql_restart(postgres, settings, submit, client, auth, app):
    job = submit(config=SLOW).json()
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(status=run_job(
        app.state.sessions, app.state.store, settings, UUID(job["id"]))))
    runner.start()
    wait_for(lambda: client.get(job["links"]["self"], headers=auth).json()["progress"]["stage"] == "recovery",
             "the job to reach its recovery stage")

    postgres.stop()  # every pooled connection of the API and the worker is now dead
    assert client.get("/jobs", headers=auth).status_code == 503
    postgres.start()
    assert client.get("/jobs", headers=auth).status_code == 200  # pre-ping replaced the dead connections

    runner.join(PATIENCE_S)
    assert outcome["status"] == "succeeded"
    done = client.get(job["links"]["self"], headers=auth).json()
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
