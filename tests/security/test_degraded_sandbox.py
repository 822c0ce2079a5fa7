"""Where the kernel cannot confine the engine: here as under a Docker engine older than 23.0,
whose seccomp profile refuses the Landlock syscalls (the same kind of filter, installed in the
process under test before it starts, is inherited by everything it runs). A worker then refuses
to start, a job refuses to run, and `baerase sanitize` warns but still refuses a hostile model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.security.payloads import WritesAFile, samples, torchscript
from worker import confine

REPO = Path(__file__).resolve().parents[2]
LANDLOCK_SYSCALLS = (confine.SYS_LANDLOCK_CREATE_RULESET, confine.SYS_LANDLOCK_ADD_RULE,
                     confine.SYS_LANDLOCK_RESTRICT_SELF)

pytestmark = pytest.mark.skipif(not confine.landlock_abi()[0], reason="no Landlock here to take away")


def without_landlock() -> None:
    confine.deny_syscalls(LANDLOCK_SYSCALLS)


def run(command: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BAERASE_")}
    environment |= {"BAERASE_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, *command], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=300, preexec_fn=without_landlock)


def test_a_worker_refuses_to_start(tmp_path):
    done = run(["-m", "app.cli", "worker", "--device", "cpu"], tmp_path)
    assert done.returncode == 1, done.stderr
    assert "cannot confine the engine fully on this machine" in done.stderr
    assert "seccomp profile refuses the Landlock syscalls" in done.stderr


def test_a_job_refuses_to_run(tmp_path):
    (tmp_path / "model.pt").write_bytes(torchscript(WritesAFile(tmp_path / "target")))
    (tmp_path / "clean.npz").write_bytes(samples())
    script = f"""
from pathlib import Path
from worker.sandbox import SandboxError, run_sanitize_sandboxed
from worker.sanitize.config import SanitizeConfig
try:
    run_sanitize_sandboxed(Path({str(tmp_path / 'model.pt')!r}), Path({str(tmp_path / 'clean.npz')!r}),
                           Path({str(tmp_path / 'out')!r}), SanitizeConfig(), require=True)
except SandboxError as e:
    print(e)
"""
    done = run(["-c", script], tmp_path)
    assert "the engine sandbox is incomplete on this machine" in done.stdout, done.stderr
    assert not (tmp_path / "target").exists()


def test_baerase_sanitize_warns_and_still_refuses_a_hostile_model(tmp_path):
    target = tmp_path / "target"
    (tmp_path / "model.pt").write_bytes(torchscript(WritesAFile(target)))
    (tmp_path / "clean.npz").write_bytes(samples())
    done = run(["-m", "app.cli", "sanitize", str(tmp_path / "model.pt"), "--samples", str(tmp_path / "clean.npz"),
                "--out", str(tmp_path / "out"), "--quiet"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert "warning: the engine runs with an incomplete sandbox" in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "aten::from_file" in errors[0], done.stderr
    assert not target.exists()
