"""The commands speak in commands: a hint of the API that names an HTTP request ("list yours with
GET /jobs", "poll /jobs/ID") reaches a `baerase` user as the command that does the same, and an
operator's command that lacks an extra says which to install."""

import re
import subprocess
import sys
import uuid
from datetime import datetime, timezone

import httpx
import pytest

from app.api.problems import Problem
from app.api.routes.jobs import require_unexpired
from app.cli.remote import in_commands
from app.client import ApiError, raise_for_problem
from app.core.models import Job
from tests.clients.conftest import KEY, SLOW_CONFIG, baerase

HTTP_WORDS = re.compile(r"\b(GET|POST|DELETE) /|poll /|/jobs/|/docs")


def error_of(response: httpx.Response) -> ApiError:
    with pytest.raises(ApiError) as raised:
        raise_for_problem(response)
    return raised.value


def test_the_api_hints_reach_the_command_line_as_commands(server, client, backdoored_digits):
    auth = {"Authorization": f"Bearer {KEY}"}
    unknown = str(uuid.uuid4())
    missing = error_of(httpx.get(f"{server.url}/jobs/{unknown}", headers=auth))
    assert "GET /jobs" in missing.detail
    assert in_commands(missing, server.url) == (f"there is no job {unknown} for this API key; "
                                                "`baerase jobs` lists yours")

    job = client.submit(*backdoored_digits, SLOW_CONFIG)
    unfinished = error_of(httpx.get(f"{server.url}/jobs/{job.id}/model", headers=auth))
    client.cancel(job.id)
    assert f"poll /jobs/{job.id}" in unfinished.detail
    assert f"(follow it with `baerase status {job.id}`)" in in_commands(unfinished, server.url)

    # Retention's 410, in the words of the API's own check.
    expired = Job(id=uuid.uuid4(), expired_at=datetime(2026, 1, 2, tzinfo=timezone.utc))
    with pytest.raises(Problem) as gone:
        require_unexpired(expired, "the sanitized model")
    gone_error = ApiError(410, {"status": 410, "detail": gone.value.detail})
    assert f"/jobs/{expired.id}/report" in gone_error.detail
    assert in_commands(gone_error, server.url).endswith(f"(its result stays: `baerase status {expired.id} --json`)")

    for error in (missing, unfinished, gone_error):
        assert not HTTP_WORDS.search(in_commands(error, server.url)), in_commands(error, server.url)


def test_a_url_that_is_no_baerase_service_is_named(server):
    run = baerase(f"{server.url}/not-the-api", "jobs")
    assert run.returncode == 2
    assert run.stderr == (f"error: {server.url}/not-the-api does not answer as a BAERASE service "
                          "(/not-the-api/jobs is not found there); check --server or $BAERASE_SERVER\n")


@pytest.mark.parametrize("command, words", [(["serve", "--embedded", "--port", "1"], "serve --embedded"),
                                            (["worker"], "worker")])
def test_a_worker_without_the_engine_says_which_extra_to_install(command, words, tmp_path):
    # torch as a machine without the worker extra has it: not there to import.
    without_torch = f"import sys; sys.modules['torch'] = None; from app.cli import main; sys.exit(main({command!r}))"
    run = subprocess.run([sys.executable, "-c", without_torch], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert (run.returncode, run.stderr) == (2, f"error: `baerase {words}` needs torch, which this installation "
                                               "lacks: pip install 'baerase[worker]'\n")
    assert not list(tmp_path.iterdir())  # refused before it made its database
