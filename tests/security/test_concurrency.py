"""The API holds many concurrent clients: 100 status reads at once, through a real server with
a thread pool (and so a connection pool) of only 4, all answer 2xx; none waits for a pooled
connection it cannot get. Nothing here measures time (docs/deploy.md has the wrk figures)."""

import asyncio

import httpx
import pytest

from app.main import create_app
from tests.security.refusals import server  # noqa: F401  (a fixture)

CLIENTS = 100


@pytest.fixture
def settings(settings):
    # status_cache_s stays 0 (tests/api/conftest.py): every read goes to the database.
    return settings.model_copy(update={"api_threads": 4})


def test_a_hundred_concurrent_status_reads_all_answer(server, torchscript_model, samples):
    from app.core.security import create_api_key

    app, url = server
    with app.state.sessions() as session:
        headers = {"Authorization": f"Bearer {create_api_key(session, 'acme')}"}
    created = httpx.post(f"{url}/jobs", headers=headers,
                         files={"model": ("m.pt", torchscript_model), "samples": ("s.npz", samples)})
    assert created.status_code == 202, created.text
    job = created.json()["links"]["self"]
    # Each client its own connection: status, list and delivery log, which all read the database.
    paths = [job, "/jobs", f"{job}/webhooks"] * (CLIENTS // 3) + [job] * (CLIENTS % 3)

    async def read_all() -> list[int]:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120) as client:
            answers = await asyncio.gather(*(client.get(path) for path in paths))
        return [answer.status_code for answer in answers]

    statuses = asyncio.run(read_all())
    assert len(statuses) == CLIENTS and all(200 <= s < 300 for s in statuses), statuses


def test_a_cached_status_stays_with_its_tenant(client, submit, auth, other_auth, sessions, settings):
    """With the status cache on: a cached job is no one else's, and this process's cancel is
    seen at once."""
    from fastapi.testclient import TestClient

    cached = create_app(settings.model_copy(update={"status_cache_s": 60}))
    with TestClient(cached) as api:
        job = submit().json()
        assert api.get(job["links"]["self"], headers=auth).json()["status"] == "queued"
        assert api.get(job["links"]["self"], headers=other_auth).status_code == 404
        assert api.post(job["links"]["cancel"], headers=auth).status_code == 202
        assert api.get(job["links"]["self"], headers=auth).json()["status"] == "cancelled"
