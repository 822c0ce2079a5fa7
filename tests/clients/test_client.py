"""The Python client (app.client) against the live server."""

import json
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch

from app.client import Client, Conflict, InvalidRequest, NotFound, Unauthorized, Unreachable
from tests.clients.conftest import KEY, SLOW_CONFIG
from tests.live_server import REPO, free_port

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_finished_job_and_its_results(client, finished_job, tmp_path):
    job = client.get(finished_job.id)
    assert job.status == "succeeded" and job.finished and job.progress.fraction == 1.0
    assert 0 in job.result["detected_targets"]
    assert finished_job.id in [j.id for j in client.list(status="succeeded")]
    assert len(client.list(limit=1)) == 1

    target = next(t for t in client.triggers(job.id) if t.class_index == 0)
    assert {"pattern", "stamped"} <= set(target.images)
    assert client.trigger_image(target.images["stamped"]).startswith(PNG)
    assert client.report(job.id)["detected_targets"] == job.result["detected_targets"]

    model = client.download_model(job.id, tmp_path)
    assert model.name == "model.sanitized.pt"  # the server's name for the upload model.pt
    assert torch.jit.load(str(model))(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    assert client.download_model(job.id, tmp_path / "copy.pt").read_bytes() == model.read_bytes()


def test_submit_is_idempotent_and_a_job_can_be_cancelled_and_deleted(client, backdoored_digits):
    model, samples = backdoored_digits
    key = str(uuid.uuid4())
    job = client.submit(model, samples, SLOW_CONFIG, idempotency_key=key)
    assert job.status == "queued"
    assert client.submit(model, samples, SLOW_CONFIG, idempotency_key=key).id == job.id

    asked = client.cancel(job.id)
    assert asked.status == "cancelled" or asked.cancel_requested  # queued: at once; running: soon
    seen = []
    final = client.wait(job.id, on_progress=seen.append, poll_interval_s=0.5)
    assert final.status == "cancelled" and seen[-1] == final

    client.delete(job.id)
    with pytest.raises(NotFound):
        client.get(job.id)


def test_errors_carry_the_problem_detail(server, client, finished_job, backdoored_digits, tmp_path):
    model, samples = backdoored_digits
    with pytest.raises(NotFound) as missing:
        client.get(str(uuid.uuid4()))
    assert missing.value.status == 404 and "there is no job" in missing.value.detail
    assert missing.value.problem["instance"].startswith("/jobs/")

    with Client(server.url, "not-a-key") as stranger, pytest.raises(Unauthorized) as unknown_key:
        stranger.list()
    assert "not known" in unknown_key.value.detail

    text = tmp_path / "model.pt"
    text.write_text("not a model")
    with pytest.raises(InvalidRequest) as not_a_model:
        client.submit(text, samples)
    assert not_a_model.value.status == 415

    with pytest.raises(InvalidRequest) as bad_config:
        client.submit(model, samples, {"recovery": {"stepz": 1}})
    assert bad_config.value.status == 422
    assert [e["loc"] for e in bad_config.value.problem["errors"]] == ["config.recovery.stepz"]

    with pytest.raises(Conflict) as finished:
        client.cancel(finished_job.id)
    assert "already succeeded" in finished.value.detail


def test_unreachable_server():
    with Client(f"http://127.0.0.1:{free_port()}", KEY, retries=2, backoff_s=0.01) as client:
        with pytest.raises(Unreachable, match="cannot reach"):
            client.list()


def flaky_proxy(upstream: str) -> type[BaseHTTPRequestHandler]:
    """A stand-in for a load balancer in front of the live server while it restarts: it drops the
    first connection, answers the second request 503, and forwards the rest."""

    class FlakyProxy(BaseHTTPRequestHandler):
        requests = 0

        def do_GET(self):
            FlakyProxy.requests += 1
            if FlakyProxy.requests == 1:
                return  # closes the connection without an answer
            if FlakyProxy.requests == 2:
                status, headers, body = 503, {"Retry-After": "0", "Content-Type": "application/problem+json"}, \
                    json.dumps({"status": 503, "detail": "restarting"}).encode()
            else:
                answer = httpx.get(upstream + self.path, headers={"Authorization": self.headers["Authorization"]})
                status, headers, body = answer.status_code, {"Content-Type": answer.headers["content-type"]}, answer.content
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return FlakyProxy


def test_connection_errors_and_503_are_retried(server, finished_job):
    handler = flaky_proxy(server.url)
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with Client(f"http://127.0.0.1:{proxy.server_port}", KEY, backoff_s=0.01) as client:
            assert client.get(finished_job.id).status == "succeeded"
    finally:
        proxy.shutdown()
    assert handler.requests == 3


def test_the_client_does_not_load_torch_or_the_web_stack():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, app.client; "
         "print([m for m in ('torch', 'sqlalchemy', 'fastapi') if m in sys.modules])"],
        capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert loaded.strip() == "[]"
