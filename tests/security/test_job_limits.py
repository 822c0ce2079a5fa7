"""The job wall-time limit (BAERASE_JOB_SOFT_TIME_LIMIT_S) holds on every kind of worker: the
sandbox kills the engine's process and the job fails with time_limit. The model here runs
forever on allowed operations, so only the limit can stop it."""

from uuid import UUID

import pytest

from app.core.config import Settings
from tests.api.test_celery_workers import broker, wait_until_finished, workers  # noqa: F401  (fixtures)
from tests.security.payloads import RunsForever, samples, torchscript
from tests.security.sandbox_tasks import sandbox_children
from worker.runner import run_job

LIMIT_S = 3


@pytest.fixture
def settings(database_url, tmp_path, request) -> Settings:
    # The Celery tests' broker comes only with the test that asks for it.
    broker_url = request.getfixturevalue("broker").url if "broker" in request.fixturenames else None
    return Settings(_env_file=None, database_url=database_url, data_dir=tmp_path / "data", api_key=None,
                    broker_url=broker_url, job_soft_time_limit_s=LIMIT_S)


@pytest.fixture(scope="module")
def endless_model() -> bytes:
    return torchscript(RunsForever())


def assert_failed_at_the_limit(body: dict) -> None:
    assert body["status"] == "failed", body
    assert body["error"]["code"] == "time_limit", body
    assert f"time limit ({LIMIT_S} s)" in body["error"]["message"], body


def test_the_polling_worker_fails_a_job_at_the_time_limit(app, client, submit, auth, endless_model):
    job = submit(model=endless_model, samples=samples()).json()
    assert run_job(app.state.sessions, app.state.store, app.state.settings, UUID(job["id"])) == "failed"
    assert_failed_at_the_limit(client.get(job["links"]["self"], headers=auth).json())
    assert not sandbox_children(), "the engine's process outlived its job"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_celery_worker_fails_a_job_at_the_time_limit(client, submit, auth, settings, broker, workers,
                                                      endless_model):
    workers.env["BAERASE_JOB_SOFT_TIME_LIMIT_S"] = str(LIMIT_S)
    job = submit(model=endless_model, samples=samples()).json()
    workers.start()
    assert_failed_at_the_limit(wait_until_finished(client, auth, job, workers))

