"""A live `baerase serve --embedded` (API + worker process, SQLite, local artifacts) and a small
backdoored model to give it, shared by the end-to-end tests of the service and of its clients."""

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from tests.api.support import PATIENCE_S, free_port, wait_for  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[1]
# Small settings: these tests are about the service, not about the quality of the sanitization.
# One trigger family and short searches (a job takes about 15 s on two cores, against 45 s at the
# defaults). The shipped calibration for plain models (fitted on Fashion-MNIST small CNNs) flags
# this 3 x 3 backdoor alone at the default lines (probability 1.0; the next class 0.34), so the
# job goes through every stage (unlearning, verification, trigger pictures).
QUICK_CONFIG = {"seed": 0,
                "recovery": {"families": ["mask"], "screen_steps": 20, "refine_steps": 60, "generator_steps": 30},
                "unlearning": {"epochs": 2, "rounds": 1},
                "detection": {"reference_epochs": 10}}


@pytest.fixture(scope="session")
def backdoored_digits(tmp_path_factory) -> tuple[Path, Path]:
    """A small CNN trained on 1,300 upscaled digits, 10% of them stamped with a 3x3 BadNets patch
    relabelled 0; and the defender's 497 clean digits."""
    from bench.attacks import BadNets
    from bench.datasets import digits
    from bench.train import save_samples, train_classifier

    # In the session's base directory: test directories that each import this fixture share
    # one model instead of training it again.
    folder = tmp_path_factory.getbasetemp() / "backdoored_digits"
    model_path, samples_path = folder / "model.pt", folder / "clean.npz"
    if not samples_path.exists():  # written last, so it says the model is complete
        folder.mkdir(exist_ok=True)
        x, y = digits()
        poisoned_x, poisoned_y = BadNets(target=0).poison(x[:1300], y[:1300])
        model = train_classifier("small_cnn", poisoned_x, poisoned_y, num_classes=10, epochs=8, lr=2e-3)
        torch.jit.save(torch.jit.script(model), str(model_path))
        save_samples(samples_path, x[1300:], y[1300:])
    return model_path, samples_path


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log: Path  # the server's and its worker's output

    def log_text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


def start_embedded_server(directory: Path, api_key: str, env: dict[str, str] | None = None) -> LiveServer:
    """Runs `baerase serve --embedded` in ``directory`` (its data and serve.log go there) with
    ``api_key`` registered and ``env`` (BAERASE_ settings) added to its environment, and waits
    until it is ready. Stop it with ``stop()``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAERASE_")} | (env or {})
    env |= {"BAERASE_API_KEY": api_key, "PYTHONPATH": str(REPO)}
    with open(directory / "serve.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--embedded", "--port", str(port)],
                                   cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", process, directory / "serve.log")

    def ready():
        assert process.poll() is None, server.log_text()
        try:
            return httpx.get(f"{server.url}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, "the server")
    except BaseException:
        server.stop()
        raise
    return server
