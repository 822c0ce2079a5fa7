"""The engine's sandbox on its own (worker/sandbox.py): what a model that got past the operation
allow-list could try, run as a task in the sandbox's child in place of the engine."""

import time
from pathlib import Path

import pytest

from tests.security.sandbox_tasks import sandbox_children
from worker.sandbox import Limits, ResourceLimitExceeded, TimeLimitExceeded, probe, run_sandboxed
from worker.sanitize.errors import Cancelled

TESTS = Path(__file__).resolve().parents[1]  # the child imports its tasks from here
TASKS = "tests.security.sandbox_tasks"

confinement = probe()
pytestmark = pytest.mark.skipif(not confinement.complete,
                                reason=f"this kernel cannot confine the engine: {confinement.describe()}")


def run(task: str, argument: dict, read=(), write=(), **options):
    return run_sandboxed(f"{TASKS}:{task}", argument, read=[TESTS, *read], write=list(write), **options)


def test_the_child_reads_only_what_it_is_given(tmp_path):
    given, secret = tmp_path / "given.txt", tmp_path / "secret.txt"
    given.write_text("the job's input")
    secret.write_text("another tenant's data")
    # The service's own files sit beside the code, as baerase-data/ does in a checkout.
    repository_file = TESTS.parent / "pyproject.toml"
    result = run("read", {"paths": [str(given), str(secret), str(repository_file), "/etc/passwd"]},
                 read=[given])
    assert result["outcomes"] == {str(given): "done", str(secret): "PermissionError",
                                  str(repository_file): "PermissionError", "/etc/passwd": "PermissionError"}
    assert result["text"] == {str(given): "the job's input"}


def test_the_child_writes_only_its_output_directory(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    given = tmp_path / "input.txt"
    given.write_text("original")
    result = run("write", {"paths": [str(out / "model.pt"), str(elsewhere / "x"), str(given)]},
                 read=[given], write=[out])
    assert result == {str(out / "model.pt"): "done", str(elsewhere / "x"): "PermissionError",
                      str(given): "PermissionError"}
    assert not (elsewhere / "x").exists() and given.read_text() == "original"


def test_the_child_sees_none_of_the_parents_secrets(monkeypatch):
    monkeypatch.setenv("BAERASE_DATABASE_URL", "postgresql+psycopg://baerase:hunter2@db/baerase")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-aws")
    result = run("environment", {})
    assert "hunter2" not in str(result["own"]) and not any(k.startswith("BAERASE_") for k in result["own"])
    assert result["parent"] == "PermissionError" and "hunter2" not in result["parent_text"]


def test_the_child_has_no_network():
    # PostgreSQL listens here on TCP and on a Unix socket (tests/api/conftest.py uses it).
    result = run("connect", {"port": 5432, "unix_path": "/var/run/postgresql/.s.PGSQL.5432"})
    assert result == {"tcp": "PermissionError", "unix": "PermissionError"}


def test_cancellation_kills_the_child():
    progress = []

    def check_cancel():
        if len(progress) >= 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        run("sleep", {}, progress=lambda *step: progress.append(step), check_cancel=check_cancel)
    assert progress[0] == ("recovery", 0.0, "step 0")
    assert not sandbox_children()


def test_the_wall_time_limit_kills_the_child():
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded, match=r"longer than its time limit \(1 s\)"):
        run("sleep", {}, limits=Limits(wall_time_s=1))
    assert time.monotonic() - started < 60  # a hang guard, not a speed requirement
    assert not sandbox_children()


def test_the_cpu_time_limit_ends_the_child():
    with pytest.raises(ResourceLimitExceeded, match="CPU-time limit"):
        run("burn_cpu", {}, limits=Limits(cpu_time_s=1))


@pytest.mark.parametrize("limit", ["address space", "resident memory"])
def test_the_memory_limit_ends_the_child(limit):
    mib = 1024**2
    options = ({"address_space_bytes": 1024 * mib} if limit == "address space" else
               {"limits": Limits(memory_bytes=256 * mib)})
    with pytest.raises(ResourceLimitExceeded, match="memory"):
        run("allocate", {"bytes": 2048 * mib if limit == "address space" else 512 * mib, "hold_s": 30}, **options)
    assert not sandbox_children()

