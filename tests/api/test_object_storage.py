"""Object storage: the artifact store in S3, and job inputs named by URL (model_url, samples_url),
against a real S3 API (moto's server, tests/s3_server.py) and a local HTTP server."""

import importlib.util
import json
import os
import subprocess
import sys
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from uuid import UUID

import pytest
from sqlalchemy import update

from app.client import Client
from app.core.lifecycle import claim, expire_finished_jobs, finish
from app.core.models import Job, JobStatus, utcnow
from tests.api.support import PATIENCE_S, assert_problem
from tests.live_server import REPO, QUICK_CONFIG, backdoored_digits, start_embedded_server  # noqa: F401

KEY = "object-storage-test-key"


@pytest.fixture
def input_bucket(s3_server) -> str:
    return s3_server.new_bucket()


@pytest.fixture
def settings(settings, s3_server, input_bucket):
    """The API tests' settings with the artifacts in a bucket of their own and ``input_bucket``
    open to s3:// inputs."""
    return settings.model_copy(update={
        "artifact_store_url": f"s3://{s3_server.new_bucket()}/baerase", "s3_endpoint_url": s3_server.endpoint_url,
        "input_buckets": [f"s3://{input_bucket}"]})


def submit_urls(client, auth, model_url=None, samples_url=None, model=None, samples=None):
    """POSTs a job whose inputs are named by URL (or uploaded, where given)."""
    files = {name: (None, url) for name, url in (("model_url", model_url), ("samples_url", samples_url)) if url}
    files |= {name: (f"{name}.bin", data) for name, data in (("model", model), ("samples", samples)) if data}
    return client.post("/jobs", files=files, headers=auth)


class FileServer:
    """A local HTTP server answering GET /NAME with ``files[NAME]``, without a Content-Length
    when ``announce_length`` is False (the size shows only as the bytes arrive)."""

    def __init__(self, files: dict[str, bytes], announce_length: bool = True):
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                name = self.path.split("?")[0].lstrip("/")
                if name == "moved":
                    self.send_response(302)
                    self.send_header("Location", "http://169.254.169.254/latest/meta-data")
                    self.end_headers()
                    return
                if name not in files:
                    self.send_error(404)
                    return
                self.send_response(200)
                if announce_length:
                    self.send_header("Content-Length", str(len(files[name])))
                self.end_headers()
                self.wfile.write(files[name])

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.server.protocol_version = "HTTP/1.0"  # without a length, the end of the body is the close
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def file_server(torchscript_model, samples):
    server = FileServer({"model.pt": torchscript_model, "clean.npz": samples})
    yield server
    server.close()


def test_model_and_samples_by_s3_url(client, auth, s3_server, input_bucket, settings, torchscript_model,
                                     samples):
    s3_server.client.put_object(Bucket=input_bucket, Key="models/v1/model.pt", Body=torchscript_model)
    s3_server.client.put_object(Bucket=input_bucket, Key="data/clean.npz", Body=samples)
    created = submit_urls(client, auth, f"s3://{input_bucket}/models/v1/model.pt?versionId=null",
                          f"s3://{input_bucket}/data/clean.npz")
    assert created.status_code == 202, created.text
    job = created.json()
    assert job["model_source"] == f"s3://{input_bucket}/models/v1/model.pt"
    assert job["inputs"]["model"]["filename"] == "model.pt"
    assert job["inputs"]["model"]["size"] == len(torchscript_model)
    assert job["inputs"]["samples"]["size"] == len(samples)
    assert client.get(f"/jobs/{job['id']}", headers=auth).json()["model_source"] == job["model_source"]
    # Stored in the artifact store's bucket, under its prefix; nothing left in local staging.
    store_bucket, prefix = settings.artifact_store_url.removeprefix("s3://").split("/", 1)
    assert s3_server.keys(store_bucket) == [f"{prefix}/jobs/{job['id']}/model.pt",
                                            f"{prefix}/jobs/{job['id']}/samples.npz"]
    assert not any(path.is_file() for path in (settings.data_dir / "staging").rglob("*"))

    assert client.delete(f"/jobs/{job['id']}", headers=auth).status_code == 204
    assert s3_server.keys(store_bucket) == []


def test_an_uploaded_model_has_no_source(submit):
    created = submit()
    assert created.status_code == 202, created.text
    assert created.json()["model_source"] is None


def test_a_refused_job_leaves_no_object(client, auth, s3_server, settings, torchscript_model, samples):
    store_bucket = settings.artifact_store_url.removeprefix("s3://").split("/")[0]
    refused = client.post("/jobs", headers=auth, data={"config": '{"seed": "zero"}'},
                          files={"model": ("model.pt", torchscript_model), "samples": ("clean.npz", samples)})
    assert_problem(refused, 422, "seed")
    assert s3_server.keys(store_bucket) == []


def test_retention_deletes_the_objects(submit, sessions, settings, s3_server, app):
    job_id = UUID(submit().json()["id"])
    finish(sessions, settings, claim(sessions, job_id), JobStatus.failed, "internal_error", "it broke")
    with sessions() as session:
        session.execute(update(Job).values(finished_at=utcnow() - timedelta(days=settings.artifact_retention_days + 1)))
        session.commit()
    store_bucket = settings.artifact_store_url.removeprefix("s3://").split("/")[0]
    assert len(s3_server.keys(store_bucket)) == 2
    assert expire_finished_jobs(sessions, app.state.store, settings) == [job_id]
    assert s3_server.keys(store_bucket) == []


@pytest.mark.parametrize("url, says", [
    ("s3://{other}/model.pt", "BAERASE_INPUT_BUCKETS"),
    ("s3://{input}/missing/model.pt", "does not exist"),
    ("s3://{input}/a/../model.pt", "does not name an object"),
    ("ftp://example.com/model.pt", "https://, http://, s3://, gs://"),
    ("model.pt", "without a scheme"),
])
def test_unusable_urls_are_refused(client, auth, s3_server, input_bucket, samples, url, says):
    url = url.format(input=input_bucket, other=s3_server.new_bucket())
    problem = assert_problem(submit_urls(client, auth, url, samples=samples), 422, "model_url", says)
    assert problem["errors"][0]["loc"] == "model_url"


def test_the_artifact_store_is_not_an_input(client, auth, settings, samples):
    store = settings.artifact_store_url
    with_store_open = settings.input_buckets + [store.rsplit("/", 1)[0]]
    client.app.state.settings.input_buckets = with_store_open
    assert_problem(submit_urls(client, auth, f"{store}/jobs/x/model.pt", samples=samples), 422,
                   "inside the service's artifact store")


def test_gs_urls_need_gcsfs(client, auth, samples):
    if importlib.util.find_spec("gcsfs"):
        pytest.skip("gcsfs is installed here")
    client.app.state.settings.input_buckets = ["gs://models"]
    assert_problem(submit_urls(client, auth, "gs://models/model.pt", samples=samples), 422, "pip install gcsfs")


def test_a_url_and_a_file_for_one_input_are_refused(client, auth, torchscript_model, samples, input_bucket):
    assert_problem(submit_urls(client, auth, f"s3://{input_bucket}/model.pt", model=torchscript_model,
                               samples=samples), 422, "both model and model_url")


# The tests below change the app's settings in place, as an operator would set them at start-up.

def test_http_urls_to_loopback_are_refused_unless_allowed(client, auth, file_server, torchscript_model):
    for scheme in ("https", "http"):
        refused = submit_urls(client, auth, f"{scheme}://127.0.0.1:{file_server.server.server_port}/model.pt",
                              f"{file_server.base}/clean.npz")
        assert_problem(refused, 422, "model_url", "not a public address", "BAERASE_INPUT_URL_ALLOWED_HOSTS")
    assert file_server.requests == []  # refused before connecting

    client.app.state.settings.input_url_allowed_hosts = ["127.0.0.1"]
    created = submit_urls(client, auth, f"{file_server.base}/model.pt?X-Amz-Signature=secret&X-Amz-Credential=k",
                          f"{file_server.base}/clean.npz")
    assert created.status_code == 202, created.text
    job = created.json()
    assert job["model_source"] == f"{file_server.base}/model.pt"  # the presigned query left out
    assert job["inputs"]["model"]["size"] == len(torchscript_model)


def test_redirects_are_not_followed(client, auth, file_server):
    client.app.state.settings.input_url_allowed_hosts = ["127.0.0.1"]
    assert_problem(submit_urls(client, auth, f"{file_server.base}/moved", f"{file_server.base}/clean.npz"),
                   422, "redirect", "give the final URL")
    assert file_server.requests == ["/moved"]


def test_a_url_that_answers_an_error(client, auth, file_server):
    client.app.state.settings.input_url_allowed_hosts = ["127.0.0.1"]
    assert_problem(submit_urls(client, auth, f"{file_server.base}/gone.pt", f"{file_server.base}/clean.npz"),
                   422, "answered 404")


@pytest.mark.parametrize("announce_length", [True, False])
def test_an_oversized_url_input_is_413(client, auth, s3_server, input_bucket, torchscript_model, samples,
                                       announce_length):
    client.app.state.settings.max_samples_bytes = len(samples) - 1
    client.app.state.settings.input_url_allowed_hosts = ["127.0.0.1"]
    server = FileServer({"clean.npz": samples}, announce_length)
    s3_server.client.put_object(Bucket=input_bucket, Key="clean.npz", Body=samples)
    try:
        for url in (f"{server.base}/clean.npz", f"s3://{input_bucket}/clean.npz"):
            refused = submit_urls(client, auth, samples_url=url, model=torchscript_model)
            assert_problem(refused, 413, "samples_url", "limit for the samples", "BAERASE_MAX_SAMPLES_BYTES")
    finally:
        server.close()


def test_a_url_input_gets_the_uploads_byte_checks(client, auth, s3_server, input_bucket, samples):
    s3_server.client.put_object(Bucket=input_bucket, Key="model.pt", Body=b"not a model at all")
    s3_server.client.put_object(Bucket=input_bucket, Key="clean.npz", Body=samples)
    assert_problem(submit_urls(client, auth, f"s3://{input_bucket}/model.pt", f"s3://{input_bucket}/clean.npz"),
                   415, "model.pt is not a model file")


def test_a_job_end_to_end_with_the_s3_store(tmp_path, s3_server, backdoored_digits):
    """`baerase serve --embedded` with its artifacts in S3, given a job by s3:// URLs from the
    command line: the job runs, the client downloads its results from the bucket, and deleting
    it removes its objects."""
    model_path, samples_path = backdoored_digits
    store_bucket, input_bucket = s3_server.new_bucket(), s3_server.new_bucket()
    s3_server.client.upload_file(str(model_path), input_bucket, "digits/model.pt")
    s3_server.client.upload_file(str(samples_path), input_bucket, "digits/clean.npz")
    server = start_embedded_server(tmp_path, KEY, s3_server.env | {
        "BAERASE_ARTIFACT_STORE_URL": f"s3://{store_bucket}/prod", "BAERASE_INPUT_BUCKETS": f"s3://{input_bucket}"})
    config = tmp_path / "config.json"
    config.write_text(json.dumps(QUICK_CONFIG))
    try:
        submitted = subprocess.run(
            [sys.executable, "-m", "app.cli", "submit", "--model-url", f"s3://{input_bucket}/digits/model.pt",
             "--samples-url", f"s3://{input_bucket}/digits/clean.npz", "--config", str(config)],
            capture_output=True, text=True, timeout=PATIENCE_S,
            env=os.environ | {"BAERASE_SERVER": server.url, "BAERASE_API_KEY": KEY, "PYTHONPATH": str(REPO)})
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        with Client(server.url, KEY) as client:
            job = client.wait(job_id, timeout=PATIENCE_S)
            assert job.status == "succeeded", (job, server.log_text())
            assert job.data["model_source"] == f"s3://{input_bucket}/digits/model.pt"
            files = client.download(job_id, tmp_path / "out")
            folder = f"prod/jobs/{job_id}"
            stored = s3_server.keys(store_bucket)
            assert {f"{folder}/model.pt", f"{folder}/samples.npz", f"{folder}/sanitized_model.pt"} <= set(stored)
            pictures = [path for path in files if path.suffix == ".png"]
            assert pictures and all(f"{folder}/triggers/{path.name}" in stored for path in pictures)
            assert files[0].read_bytes() == s3_server.client.get_object(
                Bucket=store_bucket, Key=f"{folder}/sanitized_model.pt")["Body"].read()
            assert not (tmp_path / "baerase-data" / "artifacts").exists()  # nothing on the local disk

            client.delete(job_id)
        assert s3_server.keys(store_bucket) == []
    finally:
        server.stop()
