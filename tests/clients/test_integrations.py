"""docs/integrations.md's recipes run as written against the live `baerase serve --embedded` of
the client tests: the CI step's script (its exit codes) and the pipeline step's Python function."""

import json
import re
import shutil
import subprocess

import pytest

from app.client import Client
from tests.clients.conftest import KEY, SLOW_CONFIG, baerase_command, submitted_job_id
from tests.live_server import PATIENCE_S, QUICK_CONFIG, REPO, free_port

GUIDE = REPO / "docs" / "integrations.md"


def recipe(section: str, language: str) -> str:
    """The first ```language block of a section of docs/integrations.md."""
    text = GUIDE.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", text, re.DOTALL).group(1)


@pytest.fixture
def ci_checkout(tmp_path, backdoored_digits):
    """A repository as the CI step expects it: the model, the clean samples and baerase.json."""
    model, samples = backdoored_digits
    (tmp_path / "models").mkdir()
    (tmp_path / "data").mkdir()
    shutil.copyfile(model, tmp_path / "models" / "classifier.pt")
    shutil.copyfile(samples, tmp_path / "data" / "clean.npz")
    (tmp_path / "baerase.json").write_text(json.dumps(QUICK_CONFIG))
    return tmp_path


def run_ci_step(checkout, server_url: str, script: str | None = None) -> subprocess.CompletedProcess:
    """The CI step in bash, with `baerase` on the PATH and the server and key in the environment,
    as a CI runner has them."""
    command, env = baerase_command(server_url, [], KEY)
    (checkout / "bin").mkdir(exist_ok=True)
    launcher = checkout / "bin" / "baerase"
    launcher.write_text(f'#!/bin/sh\nexec {" ".join(command)} "$@"\n')
    launcher.chmod(0o755)
    env["PATH"] = f"{checkout / 'bin'}:{env['PATH']}"
    return subprocess.run(["bash", "-c", script or recipe("CI step", "bash")], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=PATIENCE_S)


def test_the_ci_step_ships_what_the_verdict_allows(server, ci_checkout):
    run = run_ci_step(ci_checkout, server.url)
    summary = json.loads((ci_checkout / "summary.json").read_text())
    assert summary["status"] == "succeeded", run.stderr
    verdict = summary["result"]["verdict"]
    assert run.returncode == (0 if verdict in ("clean", "removed") else 6), run.stderr
    assert f"BAERASE verdict: {verdict}" in run.stdout
    assert (ci_checkout / "sanitized" / "classifier.sanitized.pt").stat().st_size > 0
    assert (ci_checkout / "sanitized" / "report.json").exists()


def test_the_ci_step_fails_with_baerase_exit_codes(server, ci_checkout):
    missing = ci_checkout / "data" / "clean.npz"
    samples = missing.read_bytes()
    missing.unlink()
    bad_input = run_ci_step(ci_checkout, server.url)
    assert bad_input.returncode == 2 and "does not exist" in bad_input.stderr
    missing.write_bytes(samples)

    unreachable = run_ci_step(ci_checkout, f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 4 and "cannot reach" in unreachable.stderr

    # Not finished in time: the step's timeout set to nothing, on a job that takes minutes.
    (ci_checkout / "baerase.json").write_text(json.dumps(SLOW_CONFIG))
    script = recipe("CI step", "bash").replace("--timeout 7200", "--timeout 0")
    unfinished = run_ci_step(ci_checkout, server.url, script)
    assert unfinished.returncode == 5 and "is still" in unfinished.stderr
    with Client(server.url, KEY) as client:
        client.cancel(submitted_job_id(unfinished.stderr))


def test_the_pipeline_step_returns_the_sanitized_model(server, backdoored_digits, mislabelled_samples,
                                                      tmp_path, monkeypatch):
    monkeypatch.setenv("BAERASE_SERVER", server.url)
    monkeypatch.setenv("BAERASE_API_KEY", KEY)
    namespace = {}
    exec(recipe("Pipeline step (Airflow / Kubeflow)", "python"), namespace)
    sanitize_step = namespace["sanitize_step"]
    model, samples = backdoored_digits
    out = tmp_path / "out"
    try:
        assert sanitize_step(str(model), str(samples), str(out), QUICK_CONFIG) == str(out / "model.sanitized.pt")
    except RuntimeError as refused:  # the verdict says not to ship: the only other way it may end
        assert re.search(r": (suspicious|residual): ", str(refused)), refused
    assert (out / "model.sanitized.pt").stat().st_size > 0 and (out / "report.json").exists()

    # A job that fails (labels beyond the model's classes) fails the step, saying why.
    with pytest.raises(RuntimeError, match=r"failed: .*invalid_input"):
        sanitize_step(str(model), str(mislabelled_samples), str(tmp_path / "again"), QUICK_CONFIG)
