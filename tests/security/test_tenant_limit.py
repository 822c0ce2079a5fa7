"""A tenant may have BAERASE_MAX_ACTIVE_JOBS_PER_TENANT jobs queued or running; beyond, a submit
answers 429 with Retry-After and stores nothing. Other tenants are not affected, and a retried
submit (same Idempotency-Key) still gets its job."""

from pathlib import Path

import pytest

from tests.security.refusals import assert_problem

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
