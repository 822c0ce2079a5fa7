"""One job end to end through `baerase serve --embedded` (API + worker process, SQLite, local
artifacts), on a small backdoored model: submit, poll, download the model and a trigger PNG."""

import base64
import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import torch

from tests.live_server import QUICK_CONFIG, backdoored_digits, start_embedded_server, wait_for  # noqa: F401

KEY = "embedded-test-key"


class WebhookReceiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_embedded_service_end_to_end(tmp_path, backdoored_digits):
    model_path, samples_path = backdoored_digits
    webhook = HTTPServer(("127.0.0.1", 0), WebhookReceiver)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    # The receiver listens on 127.0.0.1, which webhooks reach only where the operator allows it.
    server = start_embedded_server(tmp_path, KEY, {"BAERASE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"})
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"})

    try:
        config = QUICK_CONFIG | {"webhook_url": f"http://127.0.0.1:{webhook.server_port}/done"}
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
        server.stop()
        api.close()
        webhook.shutdown()
    # Stopping the server stops its worker process too.
    worker_pid = int(next(line for line in (tmp_path / "serve.log").read_text().splitlines()
                          if "worker pid" in line).rsplit(" ", 1)[1])
    wait_for(lambda: not Path(f"/proc/{worker_pid}").exists(), "the worker to stop")
