"""GET /metrics after a job has run, the workers' metrics server, and JSON log lines that name
the job and its tenant."""

import io
import json
import logging
import re
import urllib.request
from uuid import UUID

from app.core.logging_setup import JobContextFilter, JsonFormatter, job_context, setup_logging
from app.core.metrics import start_worker_metrics
from tests.api.support import free_port
from worker.runner import run_job

FAST = {"recovery": {"screen_steps": 5, "refine_steps": 5, "generator_steps": 5, "families": ["patch"]},
        "unlearning": {"epochs": 1, "rounds": 1}}


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample, found by its name and labels (in any order)."""
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        sample_name, _, label_text = sample.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if sample_name == name and found == labels:
            return float(value)
    raise AssertionError(f"no {name} {labels} in\n{text}")


def capture_json_logs():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter())
    return stream, handler


def test_metrics_after_jobs_and_their_log_lines(app, client, submit, auth, torchscript_model, samples):
    before = client.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    assert metric(before.text, "baerase_jobs", status="queued") == 0

    done, bad = submit(config=FAST).json(), submit(config=FAST).json()
    queued = client.get("/metrics").text
    assert metric(queued, "baerase_queue_depth") == 2 and metric(queued, "baerase_jobs", status="queued") == 2
    assert metric(queued, "baerase_upload_bytes_total", part="model") == 2 * len(torchscript_model)
    assert metric(queued, "baerase_upload_bytes_total", part="samples") == 2 * len(samples)

    # The second job's samples are damaged after upload: it fails fast, and still counts.
    samples_key = next(a.key for a in _job(app, bad).artifacts if a.role == "samples")
    app.state.store.local_path(samples_key).write_bytes(b"not an npz")

    stream, handler = capture_json_logs()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        for job in (done, bad):
            run_job(app.state.sessions, app.state.store, app.state.settings, UUID(job["id"]))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)

    statuses = {job["id"]: client.get(f"/jobs/{job['id']}", headers=auth).json()["status"] for job in (done, bad)}
    assert statuses == {done["id"]: "succeeded", bad["id"]: "failed"}
    text = client.get("/metrics").text
    assert metric(text, "baerase_queue_depth") == 0
    assert metric(text, "baerase_jobs", status="succeeded") == 1
    assert metric(text, "baerase_jobs", status="failed") == 1
    assert metric(text, "baerase_job_duration_seconds_count", status="succeeded") == 1
    assert metric(text, "baerase_job_duration_seconds_count", status="failed") == 1
    assert metric(text, "baerase_job_duration_seconds_bucket", status="failed", le="+Inf") == 1
    stages = [line for line in text.splitlines() if line.startswith("baerase_stage_duration_seconds_count{")]
    assert stages and all(line.endswith(" 1.0") for line in stages)
    assert 'stage="total"' not in text
    assert metric(text, "baerase_database_up") == 1

    # Every log line about a job is JSON and names the job and its tenant.
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    for job in (done, bad):
        about = [line for line in lines if job["id"] in line["message"]]
        assert about, f"no log line about {job['id']}"
        for line in about:
            assert line["job_id"] == job["id"] and line["tenant"] == "acme", line


def _job(app, job: dict):
    from app.core.models import Job

    with app.state.sessions() as session:
        found = session.get(Job, UUID(job["id"]))
        found.artifacts  # loaded while the session is open
        return found


def test_json_lines_carry_the_job_and_tenant_given_by_context_or_extra():
    stream, handler = capture_json_logs()
    log = logging.getLogger("baerase.test")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with job_context("j-1", "acme"):
            log.info("about %s", "it")
        log.warning("about another", extra={"job_id": "j-2", "tenant": "globex"})
        log.info("about nothing")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["message"] == "about it" and (lines[0]["job_id"], lines[0]["tenant"]) == ("j-1", "acme")
    assert (lines[1]["job_id"], lines[1]["tenant"], lines[1]["level"]) == ("j-2", "globex", "WARNING")
    assert "job_id" not in lines[2] and "tenant" not in lines[2]
    assert "ValueError: boom" in lines[3]["exc_info"]


def test_setup_logging_json(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("json", "INFO", "worker")
        with job_context("j-3", "acme"):
            logging.getLogger("worker.jobs").info("job j-3 done")
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["job_id"] == "j-3" and line["tenant"] == "acme" and line["logger"] == "worker.jobs"


def test_a_worker_serves_its_metrics():
    port = free_port()
    start_worker_metrics(port, ["0", "1"])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert metric(text, "baerase_worker_devices") == 2
