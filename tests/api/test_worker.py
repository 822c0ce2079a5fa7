"""The job runner on both databases: results stored and served, cancellation, refused pickles;
and the API process itself never loading torch."""

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest

from app.core.lifecycle import claim
from worker.runner import execute, run_job

REPO = Path(__file__).resolve().parents[2]
FAST = {"recovery": {"screen_steps": 5, "refine_steps": 5, "generator_steps": 5, "families": ["patch"]},
        "unlearning": {"epochs": 1, "rounds": 1}}


def run(app, job: dict):
    return run_job(app.state.sessions, app.state.store, app.state.settings, UUID(job["id"]))


def test_a_job_runs_and_its_results_are_served(app, client, submit, auth, settings, torchscript_model):
    job = submit(config=FAST).json()
    assert run(app, job) == "succeeded"
    assert run(app, job) is None  # already taken

    done = client.get(job["links"]["self"], headers=auth)
    assert "retry-after" not in done.headers
    body = done.json()
    assert body["status"] == "succeeded" and body["error"] is None
    assert body["started_at"] <= body["finished_at"]
    assert body["progress"] == {"stage": "report", "fraction": 1.0, "message": "done"}
    result = body["result"]
    assert set(result["clean_accuracy"]) == {"before", "after", "images", "margin"} and result["timings"]["total"] > 0
    assert type(result["clean_accuracy"]["images"]) is int  # a count: "49 held-out images", not "49.0"
    assert sum(c["images"] for c in result["class_accuracy"]) == result["clean_accuracy"]["images"]
    assert set(result["class_accuracy"][0]) == {"class", "before", "after", "images", "margin"}
    assert type(result["class_accuracy"][0]["class"]) is int
    assert result["backdoor_detected"] == bool(result["detected_targets"])

    model = client.get(job["links"]["model"], headers=auth)
    assert model.status_code == 200 and model.headers["content-type"] == "application/octet-stream"
    assert 'filename="model.sanitized.pt"' in model.headers["content-disposition"]
    assert model.headers["repr-digest"].startswith("sha-256=:")
    if not result["backdoor_detected"]:  # an unchanged model comes back byte for byte
        assert hashlib.sha256(model.content).digest() == hashlib.sha256(torchscript_model).digest()

    report = client.get(job["links"]["report"], headers=auth).json()
    assert report["backdoor_detected"] == result["backdoor_detected"]
    assert report["config"]["recovery"]["screen_steps"] == 5
    triggers = client.get(job["links"]["triggers"], headers=auth).json()["triggers"]
    assert len(triggers) == len(result["detected_targets"])

    folder = Path(settings.artifact_dir) / "jobs" / job["id"]
    assert (folder / "sanitized_model.pt").is_file()
    assert client.delete(job["links"]["self"], headers=auth).status_code == 204
    assert not folder.exists()


def test_a_cancelled_running_job_ends_cancelled(app, client, submit, auth):
    job = submit(config=FAST).json()
    sessions = app.state.sessions
    job_claim = claim(sessions, UUID(job["id"]))
    assert client.post(job["links"]["cancel"], headers=auth).json()["cancel_requested"] is True
    assert execute(sessions, app.state.store, app.state.settings, job_claim) == "cancelled"
    body = client.get(job["links"]["self"], headers=auth).json()
    assert body["status"] == "cancelled" and body["finished_at"] and body["result"] is None


def test_bad_input_found_by_the_worker_fails_the_job(app, client, submit, auth):
    job = submit(config=FAST | {"num_classes": 7}).json()  # the model has 10 outputs
    assert run(app, job) == "failed"
    error = client.get(job["links"]["self"], headers=auth).json()["error"]
    assert error["code"] == "invalid_input" and "num_classes is 7" in error["message"]
    assert "num_classes is 7" in client.get(job["links"]["model"], headers=auth).json()["detail"]


class OpensAFile:
    """Unpickling this object calls open(path, "w"): it creates the file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_hostile_pickle_never_runs(app, client, submit, auth, tmp_path):
    import torch

    def hostile(marker: Path) -> bytes:
        buffer = io.BytesIO()
        torch.save(OpensAFile(marker), buffer)
        return buffer.getvalue()

    # The payload is live: anything that unpickled it would create the file.
    proof = tmp_path / "proof"
    torch.load(io.BytesIO(hostile(proof)), weights_only=False)
    assert proof.exists()

    marker = tmp_path / "pwned"
    response = submit(model=hostile(marker), config=FAST | {"arch": "small_cnn"})
    assert response.status_code == 202  # well-formed torch.save archive: checked, not loaded
    assert not marker.exists()
    assert run(app, response.json()) == "failed"
    error = client.get(response.json()["links"]["self"], headers=auth).json()["error"]
    assert error["code"] == "invalid_input" and "pickled objects, which are refused" in error["message"]
    assert not marker.exists()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_api_process_never_imports_torch(tmp_path, database_url, torchscript_model, samples):
    (tmp_path / "model.pt").write_bytes(torchscript_model)
    (tmp_path / "clean.npz").write_bytes(samples)
    script = f"""
import sys
from pathlib import Path
from fastapi.testclient import TestClient
from app.core.config import Settings
from app.main import create_app
import app.cli

settings = Settings(_env_file=None, database_url={database_url!r}, data_dir=Path({str(tmp_path)!r}),
                    api_key="k")
with TestClient(create_app(settings)) as client:
    files = {{"model": open({str(tmp_path / 'model.pt')!r}, "rb"), "samples": open({str(tmp_path / 'clean.npz')!r}, "rb")}}
    job = client.post("/jobs", files=files, headers={{"Authorization": "Bearer k"}})
    assert job.status_code == 202, job.text
    assert client.get(job.json()["links"]["self"], headers={{"Authorization": "Bearer k"}}).status_code == 200
assert "torch" not in sys.modules, "the API imported torch"
"""
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True)


def test_the_worker_command_runs_jobs_and_requeues_on_stop(client, submit, auth, settings, database_url):
    """`baerase worker` picks the job up and reports progress; stopped mid-run, it puts the job
    back in the queue."""
    endless = {"recovery": {"screen_steps": 5000, "refine_steps": 20000, "converged_after": 20000, "families": ["patch"]}}
    job = submit(config=endless).json()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAERASE_")}
    env |= {"BAERASE_DATABASE_URL": database_url, "BAERASE_ARTIFACT_DIR": str(settings.artifact_dir),
            "BAERASE_WORKER_POLL_INTERVAL_S": "0.2", "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], cwd=REPO, env=env)
    try:
        def recovering():
            assert worker.poll() is None, "the worker exited"
            now = client.get(job["links"]["self"], headers=auth).json()
            assert now["status"] in ("queued", "running"), now
            return now["progress"]["stage"] == "recovery"

        while not recovering():
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0
    body = client.get(job["links"]["self"], headers=auth).json()
    assert body["status"] == "queued" and body["started_at"] is None
    assert body["progress"]["message"] == "requeued: the worker was stopped"
