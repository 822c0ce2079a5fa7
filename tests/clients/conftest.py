"""One live `baerase serve --embedded` for all client tests, and one job that runs on it to the
end through `baerase submit --wait` (the tests look at it from every client)."""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from app.client import Client
from tests.live_server import (PATIENCE_S, QUICK_CONFIG, REPO, LiveServer,  # noqa: F401
                               backdoored_digits, start_embedded_server)

KEY = "clients-test-key"
# A job that runs for minutes on these models, so that tests can catch it unfinished.
SLOW_CONFIG = {"seed": 0, "recovery": {"screen_steps": 1000, "converged_after": 20000}}


@pytest.fixture(scope="session")
def slow_config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slow_config") / "slow.json"
    path.write_text(json.dumps(SLOW_CONFIG))
    return path


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    server = start_embedded_server(tmp_path_factory.mktemp("clients_server"), KEY)
    yield server
    server.stop()


@pytest.fixture
def client(server: LiveServer):
    with Client(server.url, KEY) as client:
        yield client


def baerase_command(server_url: str, args, key: str) -> tuple[list[str], dict[str, str]]:
    """The `baerase` command line and environment a user has: server and key in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAERASE_")}
    env |= {"BAERASE_SERVER": server_url, "BAERASE_API_KEY": key, "PYTHONPATH": str(REPO)}
    return [sys.executable, "-m", "app.cli", *map(str, args)], env


def baerase(server_url: str, *args, key: str = KEY) -> subprocess.CompletedProcess:
    command, env = baerase_command(server_url, args, key)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=PATIENCE_S)


def start_baerase(server_url: str, *args, key: str = KEY) -> subprocess.Popen:
    """`baerase` running in the background, its output in pipes."""
    command, env = baerase_command(server_url, args, key)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def submitted_job_id(stderr: str) -> str:
    return re.search(r"submitted job (\S+)", stderr).group(1)


@dataclass
class FinishedJob:
    id: str
    run: subprocess.CompletedProcess  # `baerase submit --wait --out`
    out: Path


@pytest.fixture(scope="session")
def finished_job(server, backdoored_digits, tmp_path_factory) -> FinishedJob:  # noqa: F811
    """The backdoored model sanitized with `baerase submit --wait --out DIR`."""
    model, samples = backdoored_digits
    folder = tmp_path_factory.mktemp("finished_job")
    config = folder / "config.json"
    config.write_text(json.dumps(QUICK_CONFIG))
    run = baerase(server.url, "submit", model, "--samples", samples, "--config", config,
                  "--wait", "--out", folder / "out")
    return FinishedJob(submitted_job_id(run.stderr), run, folder / "out")


@pytest.fixture(scope="session")
def mislabelled_samples(backdoored_digits, tmp_path_factory) -> Path:  # noqa: F811
    """Clean samples whose labels run past the model's 10 classes: the worker fails the job."""
    with np.load(backdoored_digits[1]) as clean:
        x, y = clean["x"], clean["y"] + 5
    path = tmp_path_factory.mktemp("mislabelled") / "mislabelled.npz"
    np.savez(path, x=x, y=y)
    return path
