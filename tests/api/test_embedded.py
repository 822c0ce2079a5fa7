"""One job end to end through `baerase serve --embedded` (API + worker process, SQLite, local
artifacts), on a small backdoored model: submit, poll, download the model and a trigger PNG."""

import base64
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
KEY = "embedded-test-key"
# Small settings: the test is about the service, not about the quality of the sanitization.
CONFIG = {"seed": 0, "recovery": {"steps": 40}, "unlearning": {"max_epochs": 1, "refresh_steps": 5}}
# Hang guards only: nothing is asserted about how long things take.
PATIENCE_S = 900


@pytest.fixture(scope="session")
def backdoored_digits(tmp_path_factory) -> tuple[Path, Path]:
    """A small CNN trained on 1,300 upscaled digits, 10% of them stamped with a BadNets patch
    relabelled 0; and the defender's 497 clean digits."""
    from bench.attacks import BadNets
    from bench.datasets import digits
    from bench.train import save_samples, train_classifier

    folder = tmp_path_factory.mktemp("backdoored_digits")
    x, y = digits()
    poisoned_x, poisoned_y = BadNets(target=0, size=2).poison(x[:1300], y[:1300])
    model = train_classifier("small_cnn", poisoned_x, poisoned_y, num_classes=10, epochs=8, lr=2e-3)
    torch.jit.save(torch.jit.script(model), str(folder / "model.pt"))
    save_samples(folder / "clean.npz", x[1300:], y[1300:])
    return folder / "model.pt", folder / "clean.npz"


class WebhookReceiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str):
    deadline = time.monotonic() + PATIENCE_S
    while not (result := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)
    return result


def test_embedded_service_end_to_end(tmp_path, backdoored_digits):
    model_path, samples_path = backdoored_digits
    webhook = HTTPServer(("127.0.0.1", 0), WebhookReceiver)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAERASE_")}
    env |= {"BAERASE_API_KEY": KEY, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "serve.log", "w+")
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--embedded", "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"})

    def ready():
        assert server.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            return api.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, "the server")
        config = CONFIG | {"webhook_url": f"http://127.0.0.1:{webhook.server_port}/done"}
        with open(model_path, "rb") as model, open(samples_path, "rb") as samples:
            created = api.post("/jobs", files={"model": model, "samples": samples},
                               data={"config": json.dumps(config)})
        assert created.status_code == 202, created.text
        location = created.headers["location"]

        def finished():
            job = api.get(location).json()
            return job if job["status"] not in ("queued", "running") else None

        job = wait_for(finished, "the job")
        assert job["status"] == "succeeded", (job, (tmp_path / "serve.log").read_text())
        assert job["result"]["backdoor_detected"] and 0 in job["result"]["detected_targets"]

        model = api.get(job["links"]["model"])
        assert model.status_code == 200
        digest = model.headers["repr-digest"].removeprefix("sha-256=:").removesuffix(":")
        assert base64.b64decode(digest) == hashlib.sha256(model.content).digest()
        sanitized = torch.jit.load(io.BytesIO(model.content))
        assert sanitized(torch.zeros(2, 1, 16, 16)).shape == (2, 10)

        triggers = api.get(job["links"]["triggers"]).json()["triggers"]
        target = next(t for t in triggers if t["class"] == 0)
        png = api.get(target["images"]["stamped"])
        assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert api.get(job["links"]["report"]).json()["detected_targets"] == job["result"]["detected_targets"]

        wait_for(lambda: WebhookReceiver.received, "the webhook")
        assert WebhookReceiver.received[0]["type"] == "job.succeeded"
        assert WebhookReceiver.received[0]["data"]["id"] == job["id"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        api.close()
        webhook.shutdown()
    # Stopping the server stops its worker process too.
    worker_pid = int(next(line for line in (tmp_path / "serve.log").read_text().splitlines()
                          if "worker pid" in line).rsplit(" ", 1)[1])
    wait_for(lambda: not Path(f"/proc/{worker_pid}").exists(), "the worker to stop")
