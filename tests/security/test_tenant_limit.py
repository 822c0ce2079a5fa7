"""A tenant may have BAERASE_MAX_ACTIVE_JOBS_PER_TENANT jobs queued or running; beyond, a submit
answers 429 with Retry-After and stores nothing. Other tenants are not affected, and a retried
submit (same Idempotency-Key) still gets its job."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.core.security import create_api_key
from tests.security.refusals import assert_problem, server  # noqa: F401  (a fixture)

LIMIT = 2


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={"max_active_jobs_per_tenant": LIMIT})


def stored_files(settings) -> list[Path]:
    return sorted(p for p in Path(settings.artifact_dir).rglob("*") if p.is_file())


def test_submits_beyond_the_limit_are_429(client, submit, auth, other_auth, settings):
    jobs = [submit(headers=auth | {"Idempotency-Key": f"k{i}"}).json() for i in range(LIMIT)]
    files = stored_files(settings)

    refused = submit()
    assert_problem(refused, 429, f"{LIMIT} jobs queued or running")
    assert int(refused.headers["retry-after"]) > 0
    with_key = submit(headers=auth | {"Idempotency-Key": "new"})  # counted after the upload
    assert_problem(with_key, 429)
    assert len(client.get("/jobs", headers=auth).json()["jobs"]) == LIMIT
    assert stored_files(settings) == files  # nothing staged or stored was left

    replay = submit(headers=auth | {"Idempotency-Key": "k0"})  # a retry still gets its job
    assert replay.status_code == 202 and replay.json()["id"] == jobs[0]["id"]
    assert submit(headers=other_auth).status_code == 202  # the limit is per tenant

    client.post(jobs[0]["links"]["cancel"], headers=auth)  # a finished job no longer counts
    assert submit().status_code == 202


def test_concurrent_submits_do_not_exceed_the_limit(server, settings, torchscript_model, samples):
    app, url = server
    with app.state.sessions() as session:
        headers = {"Authorization": f"Bearer {create_api_key(session, 'acme')}"}

    def post(_) -> int:
        files = {"model": ("m.pt", torchscript_model), "samples": ("s.npz", samples)}
        return httpx.post(f"{url}/jobs", headers=headers, files=files, timeout=120).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(post, range(8)))
    assert statuses == [202] * LIMIT + [429] * (8 - LIMIT)
    jobs = httpx.get(f"{url}/jobs", headers=headers).json()["jobs"]
    assert len(jobs) == LIMIT
    assert len([p for p in stored_files(settings) if p.parent.parent.name == "jobs"]) == 2 * LIMIT
