"""A real MLflow tracking server for the tests: `mlflow server` with a SQLite backend store and a
local artifact root in the session's temporary directory, on a free local port, started once per
session (it takes some 20 s to create its database). Import the fixture into the conftest of a
test folder that uses it:

    from tests.mlflow_server import mlflow_server  # noqa: F401

The server serves the artifacts itself (``mlflow-artifacts:/``), so clients reach everything
through its URL, as the service does in production.
"""

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.api.support import free_port, wait_for

# Set for the whole session: neither the server nor the tests' MLflow clients send usage data, and
# the server starts none of the job-runner processes it would otherwise keep busy beside the tests.
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass
class MlflowServer:
    url: str
    log: Path  # the server's output

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    os.environ.update(QUIET)
    with open(log, "wb") as output:
        # A session of its own: the server's worker processes are stopped with it.
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: healthy(url) or process.poll() is not None, "the MLflow server to start")
        assert process.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
        yield MlflowServer(url, log)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
