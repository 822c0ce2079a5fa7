"""The client as a user without torch installs it: the project's wheel in a fresh virtual
environment (no system packages), which pip fills with httpx alone. The Python client and the
client's commands work there against the live server; the commands that need the service or
the engine say which extra to install."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.clients.conftest import KEY
from tests.live_server import PATIENCE_S, REPO

# One process builds the wheel for all of them: pip builds in the source tree's build/ folder, and
# two processes building it at once broke each other's copy ("No such file or directory").
pytestmark = pytest.mark.xdist_group("client_wheel")


@pytest.fixture(scope="session")
def client_venv(tmp_path_factory) -> Path:
    """A virtual environment with `pip install baerase` (the wheel, with its dependencies)."""
    folder = tmp_path_factory.mktemp("client_venv")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", folder / "wheel", REPO], check=True, timeout=PATIENCE_S)
    subprocess.run([sys.executable, "-m", "venv", folder / "venv"], check=True, timeout=PATIENCE_S)
    (wheel,) = (folder / "wheel").glob("baerase-*.whl")
    subprocess.run([folder / "venv/bin/pip", "install", "--quiet", wheel], check=True, timeout=PATIENCE_S)
    return folder / "venv"


def run_in(venv: Path, *command, server_url: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAERASE_", "PYTHON"))}
    env |= {"BAERASE_SERVER": server_url, "BAERASE_API_KEY": KEY}
    return subprocess.run([str(c) for c in command], env=env, cwd=cwd or venv, capture_output=True,
                          text=True, timeout=PATIENCE_S)


def test_the_client_installs_with_httpx_alone(client_venv):
    installed = run_in(client_venv, client_venv / "bin/pip", "list", "--format", "json")
    names = {package["name"].lower() for package in json.loads(installed.stdout)}
    assert "httpx" in names and "baerase" in names
    assert not names & {"torch", "numpy", "pydantic", "fastapi", "sqlalchemy", "celery", "tqdm"}, names


def test_the_python_client_runs_against_the_live_server(client_venv, server, finished_job, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from app.client import Client

        with Client() as baerase:  # $BAERASE_SERVER, $BAERASE_API_KEY
            job = baerase.wait({finished_job.id!r})
            files = baerase.download(job.id, {str(tmp_path)!r})
        print(job.status, len(files))
        assert not {{"torch", "numpy", "pydantic"}} & set(sys.modules)
    """)
    run = run_in(client_venv, client_venv / "bin/python", "-c", script, server_url=server.url)
    assert run.returncode == 0, run.stderr
    status, count = run.stdout.split()
    assert status == "succeeded" and int(count) >= 3  # the model, report.json, trigger pictures
    assert (tmp_path / "model.sanitized.pt").stat().st_size > 0


def test_the_client_commands_run_against_the_live_server(client_venv, server, finished_job, backdoored_digits,
                                                         slow_config_file, tmp_path):
    baerase = client_venv / "bin/baerase"
    assert run_in(client_venv, baerase, "--version").stdout.startswith("baerase ")
    status = run_in(client_venv, baerase, "status", finished_job.id, server_url=server.url)
    assert status.returncode == 0 and "succeeded" in status.stdout, status.stderr
    # Other tests add jobs to this server: the finished one is among the latest 100, not 5.
    jobs = run_in(client_venv, baerase, "jobs", "--limit", 100, server_url=server.url)
    assert jobs.returncode == 0 and finished_job.id in jobs.stdout, jobs.stderr
    download = run_in(client_venv, baerase, "download", finished_job.id, "--out", tmp_path, server_url=server.url)
    assert download.returncode == 0 and (tmp_path / "report.json").exists(), download.stderr

    model, samples = backdoored_digits
    submit = run_in(client_venv, baerase, "submit", model, "--samples", samples, "--config", slow_config_file,
                    server_url=server.url)
    assert submit.returncode == 0, submit.stderr
    cancel = run_in(client_venv, baerase, "cancel", submit.stdout.strip(), server_url=server.url)
    assert cancel.returncode == 0, cancel.stderr


def test_commands_that_need_an_extra_say_which(client_venv, tmp_path):
    run = run_in(client_venv, client_venv / "bin/baerase", "sanitize", tmp_path / "m.pt", "--samples",
                 tmp_path / "s.npz", "--out", tmp_path / "out")
    assert run.returncode == 2
    assert "needs pydantic, which this installation lacks: pip install 'baerase[worker]'" in run.stderr
    run = run_in(client_venv, client_venv / "bin/baerase", "serve")
    assert run.returncode == 2 and "pip install 'baerase[service]'" in run.stderr
