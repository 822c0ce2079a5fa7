"""The `baerase` client commands (submit, status, download, cancel, jobs) against the live
server, and each of their exit codes."""

import json
import re
import uuid
from pathlib import Path

from app.cli.common import describe_outcome
from tests.clients.conftest import KEY, baerase, start_baerase, submitted_job_id
from tests.live_server import PATIENCE_S, free_port


def test_submit_wait_runs_the_job_and_downloads_its_results(finished_job):
    run = finished_job.run
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["id"] == finished_job.id and summary["status"] == "succeeded"
    assert 0 in summary["result"]["detected_targets"]
    # The progress bar's last line, then the verdict in one line.
    assert re.search(r"^report +\[#+\] 100%  \d\d:\d\d elapsed, 00:00 left  done$", run.stderr, re.M)
    # Whether unlearning this small model ends `removed` or `residual` is the engine's call (a
    # verification at the default lines); the client shows the job's outcome.
    assert summary["result"]["verdict"] in ("removed", "residual")
    assert f"verdict: {describe_outcome(summary['result'])}" in run.stderr.splitlines()
    files = {Path(f).relative_to(finished_job.out).as_posix() for f in summary["files"]}
    assert {"model.sanitized.pt", "report.json"} <= files
    assert any(f.startswith("triggers/class0_") and f.endswith(".png") for f in files)
    assert all((finished_job.out / f).stat().st_size > 0 for f in files)
    report = json.loads((finished_job.out / "report.json").read_text())
    assert report["detected_targets"] == summary["result"]["detected_targets"]


def test_status_jobs_and_download_of_a_succeeded_job(server, finished_job, tmp_path):
    status = baerase(server.url, "status", finished_job.id)
    assert status.returncode == 0, status.stderr
    as_json = baerase(server.url, "status", finished_job.id, "--json")
    result = json.loads(as_json.stdout)["result"]
    assert result["detected_targets"] == [0]
    assert "succeeded" in status.stdout and describe_outcome(result) in status.stdout

    jobs = baerase(server.url, "jobs", "--status", "succeeded")
    assert jobs.returncode == 0 and finished_job.id in jobs.stdout

    download = baerase(server.url, "download", finished_job.id, "--out", tmp_path)
    assert download.returncode == 0, download.stderr
    files = {Path(line).relative_to(tmp_path).as_posix() for line in download.stdout.splitlines()}
    assert files == {p.relative_to(finished_job.out).as_posix() for p in finished_job.out.rglob("*") if p.is_file()}
    model = "model.sanitized.pt"
    assert (tmp_path / model).read_bytes() == (finished_job.out / model).read_bytes()


def test_server_and_key_options_take_precedence_over_the_environment(server, finished_job):
    run = baerase(f"http://127.0.0.1:{free_port()}", "status", finished_job.id,
                  "--server", server.url, "--api-key", KEY, key="not-a-key")
    assert run.returncode == 0, run.stderr


def test_a_failed_job_exits_1(server, backdoored_digits, mislabelled_samples, tmp_path):
    run = baerase(server.url, "submit", backdoored_digits[0], "--samples", mislabelled_samples,
                  "--wait", "--out", tmp_path / "out")
    assert run.returncode == 1, run.stderr
    assert "failed (invalid_input)" in run.stderr and "labels" in run.stderr
    assert json.loads(run.stdout)["error"]["code"] == "invalid_input"
    assert not (tmp_path / "out").exists()
    job_id = submitted_job_id(run.stderr)
    assert baerase(server.url, "status", job_id).returncode == 1
    assert baerase(server.url, "download", job_id, "--out", tmp_path / "out").returncode == 1


def test_a_cancelled_job_exits_3(server, backdoored_digits, slow_config_file):
    model, samples = backdoored_digits
    waiting = start_baerase(server.url, "submit", model, "--samples", samples, "--config", slow_config_file, "--wait")
    job_id = submitted_job_id(waiting.stderr.readline())
    cancel = baerase(server.url, "cancel", job_id)
    assert cancel.returncode == 0, cancel.stderr
    stdout, stderr = waiting.communicate(timeout=PATIENCE_S)
    assert waiting.returncode == 3, stderr
    assert json.loads(stdout)["status"] == "cancelled" and "was cancelled" in stderr
    assert baerase(server.url, "status", job_id).returncode == 3


def test_an_unfinished_job_exits_5(server, client, backdoored_digits, slow_config_file):
    model, samples = backdoored_digits
    run = baerase(server.url, "submit", model, "--samples", samples, "--config", slow_config_file,
                  "--wait", "--timeout", 0)
    assert run.returncode == 5, run.stderr
    assert "is still queued" in run.stderr or "is still running" in run.stderr
    job_id = submitted_job_id(run.stderr)
    assert baerase(server.url, "status", job_id).returncode == 5
    assert baerase(server.url, "cancel", job_id).returncode == 0
    assert client.wait(job_id).status == "cancelled"


def test_bad_input_exits_2(server, finished_job, backdoored_digits, tmp_path):
    model, samples = backdoored_digits
    not_json = tmp_path / "config.json"
    not_json.write_text("{seed: 0")
    not_a_model = tmp_path / "model.pt"
    not_a_model.write_text("not a model")
    cases = {
        "a missing file": (("submit", tmp_path / "missing.pt", "--samples", samples), "does not exist"),
        "a config that is not JSON": (("submit", model, "--samples", samples, "--config", not_json),
                                      "cannot read config"),
        "a file that is not a model (415)": (("submit", not_a_model, "--samples", samples), "model"),
        "an unknown job (404)": (("status", uuid.uuid4()), "for this API key; `baerase jobs` lists yours"),
        "a job that cannot be cancelled (409)": (("cancel", finished_job.id), "already succeeded"),
        "a missing option": (("submit", model), "--samples"),
    }
    for case, (args, says) in cases.items():
        run = baerase(server.url, *args)
        assert (run.returncode, says in run.stderr) == (2, True), (case, run.stderr)
    unknown_key = baerase(server.url, "jobs", key="not-a-key")
    assert unknown_key.returncode == 2 and "does not know this API key" in unknown_key.stderr
    no_key = baerase(server.url, "jobs", key="")
    assert no_key.returncode == 2 and "set BAERASE_API_KEY or pass --api-key" in no_key.stderr
    for run in (no_key, unknown_key):
        assert "Authorization" not in run.stderr and "GET /" not in run.stderr  # the CLI's words, not HTTP's


def test_an_unreachable_server_exits_4():
    run = baerase(f"http://127.0.0.1:{free_port()}", "jobs")
    assert run.returncode == 4 and "cannot reach" in run.stderr
