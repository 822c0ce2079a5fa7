"""PostgreSQL unreachable for a while (a proxy in front of it is cut): the API answers 503
problem+json and recovers; a worker's final write waits for the database and then lands."""

import logging
import threading
from uuid import UUID

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from app.core.lifecycle import claim, finish
from app.core.models import Job, JobStatus
from app.main import create_app
from tests.api.support import PATIENCE_S, CuttableProxy, wait_for

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@pytest.fixture
def proxy(database_url):
    url = make_url(database_url)
    proxy = CuttableProxy((url.host, url.port or 5432))
    yield proxy
    proxy.cut()


@pytest.fixture
def settings(settings, database_url, proxy):
    """Everything reaches PostgreSQL through the proxy."""
    through = make_url(database_url).set(port=proxy.port).render_as_string(hide_password=False)
    return settings.model_copy(update={"database_url": through})


def test_the_api_answers_503_while_the_database_is_unreachable(client, auth, proxy):
    assert client.get("/jobs", headers=auth).status_code == 200
    proxy.cut()
    response = client.get("/jobs", headers=auth)
    assert response.status_code == 503 and response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"]
    proxy.restore()
    assert client.get("/jobs", headers=auth).status_code == 200


def test_a_final_write_waits_for_the_database(submit, sessions, settings, proxy, caplog):
    job_id = UUID(submit().json()["id"])
    job_claim = claim(sessions, job_id)
    proxy.cut()
    outcome = {}
    writer = threading.Thread(target=lambda: outcome.update(
        status=finish(sessions, settings, job_claim, JobStatus.failed, "internal_error", "it broke")))
    with caplog.at_level(logging.WARNING, logger="app.core.db"):
        writer.start()
        wait_for(lambda: "the database is unavailable" in caplog.text, "the write to be retried")
    proxy.restore()
    writer.join(PATIENCE_S)
    assert outcome["status"] == "failed"
    with sessions() as session:
        job = session.get(Job, job_id)
    assert (job.status, job.error_code, job.error_message) == ("failed", "internal_error", "it broke")
