"""Runs the engine (``sanitize`` in worker/sanitize/pipeline.py) on an uploaded model, which is
untrusted code, in a child process that can read only the job's inputs and the Python
installation, write only its output directory (and a scratch directory of its own), open no
socket, signal or trace no process outside it, and sees none of the parent's environment; with
CPU-time, memory and wall-time limits. The service's workers (worker/runner.py) and
`baerase sanitize` (app/cli/local.py) both run the engine through ``run_sanitize_sandboxed``.

How: the parent starts a fresh interpreter and sends it the job as JSON on its stdin. The child
confines itself (worker/confine.py) before it imports torch, runs the engine, and answers with
JSON lines on a pipe: what confinement it got, progress, then the report or an error. The parent
relays the progress, calls ``check_cancel`` between messages, and kills the child when that
raises, at the wall-time limit, or when the child's resident memory passes the limit.

This module imports neither torch nor the service's code, so a worker's own process stays light.
"""

import importlib
import json
import logging
import os
import select
import signal
import site
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import ValidationError

from worker import confine
from worker.sanitize.errors import InputError
from worker.sanitize.report import ProgressCallback, Report

log = logging.getLogger(__name__)

# The parent's environment holds the service's secrets (database URL, API keys, cloud
# credentials): the child gets only these variables, which torch and CUDA read.
CHILD_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH",
                     "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUBLAS_WORKSPACE_CONFIG",
                     "PYTORCH_CUDA_ALLOC_CONF", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
                     "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# How often the parent checks for cancellation and the limits while the child is silent.
POLL_S = 0.2
# A message longer than this is not one the engine sends.
MAX_MESSAGE_BYTES = 64 * 1024**2
# The directory that holds the `worker` package: the child imports the same code as the parent.
CODE_ROOT = Path(__file__).resolve().parents[1]
CHILD_START = (f"import sys; sys.path.insert(0, {str(CODE_ROOT)!r}); "
               "from worker.sandbox import child_main; child_main()")


@dataclass(frozen=True)
class Limits:
    """None: no limit."""

    wall_time_s: float | None = None
    cpu_time_s: float | None = None  # over all the child's threads
    memory_bytes: int | None = None  # resident memory; also its address space when it cannot use CUDA


class SandboxError(Exception):
    """The engine's process failed for a reason other than the input; the message says why."""


class TimeLimitExceeded(SandboxError):
    pass


class ResourceLimitExceeded(SandboxError):
    """Memory or CPU time."""


def run_sanitize_sandboxed(model_path: Path, samples_path: Path, out_dir: Path, config,
                           progress: ProgressCallback | None = None,
                           check_cancel: Callable[[], None] | None = None,
                           limits: Limits = Limits(), require: bool = True) -> Report:
    """``sanitize(model_path, samples_path, out_dir, config, progress, check_cancel)`` in a
    sandboxed child that reads only the two inputs and writes only ``out_dir``; returns its
    report. Raises what ``run_sandboxed`` raises, and SandboxError for a malformed report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path, samples_path = Path(model_path).resolve(), Path(samples_path).resolve()
    argument = {"model": str(model_path), "samples": str(samples_path), "out": str(out_dir.resolve()),
                "config": config.model_dump(mode="json")}
    # RLIMIT_AS breaks CUDA, which maps far more address space than it uses.
    address_space = None if may_use_cuda(config.device) else limits.memory_bytes
    result = run_sandboxed("worker.sandbox:sanitize_task", argument, read=[model_path, samples_path],
                           write=[out_dir], limits=limits, require=require, progress=progress,
                           check_cancel=check_cancel, address_space_bytes=address_space)
    try:  # what the child sends is checked like any untrusted input
        return Report.from_stored(result)
    except ValidationError as e:
        raise SandboxError(f"the engine's report is malformed ({e.error_count()} errors)") from None


def run_sandboxed(task: str, argument: dict, read: list[Path], write: list[Path],
                  limits: Limits = Limits(), require: bool = True, progress: ProgressCallback | None = None,
                  check_cancel: Callable[[], None] | None = None, address_space_bytes: int | None = None):
    """Runs ``task`` ("module:function", called as ``function(argument, progress)``) in a child
    confined to reading ``read`` and writing ``write`` (plus the Python installation, and a
    scratch directory); returns what it returns (JSON values only).

    Raises InputError when the task does; whatever ``check_cancel`` raises (after killing the
    child); TimeLimitExceeded; ResourceLimitExceeded; SandboxError for anything else, and when
    ``require`` is set but this machine cannot confine the child fully."""
    job = {"task": task, "argument": argument, "read": [str(Path(p).resolve()) for p in read],
           "write": [str(Path(p).resolve()) for p in write], "require": require, "cpu_time_s": limits.cpu_time_s,
           "address_space_bytes": address_space_bytes}
    # closing: the child is killed when we stop listening, before its scratch directory goes.
    with tempfile.TemporaryDirectory(prefix="baerase-sandbox-") as scratch, \
            closing(run_child(job, Path(scratch), limits, check_cancel)) as messages:
        for message in messages:
            if "progress" in message and progress:
                progress(*message["progress"])
            elif "result" in message:
                return message["result"]
            elif "error" in message:
                raise child_error(message)
    raise SandboxError("the engine's process ended without a result")


def probe() -> confine.Confinement:
    """What confinement this machine gives the engine: a child confines itself and says."""
    with tempfile.TemporaryDirectory(prefix="baerase-sandbox-") as scratch, \
            closing(run_child({"probe": True, "read": [], "write": []}, Path(scratch),
                              Limits(wall_time_s=60), None)) as messages:
        for message in messages:
            if "confinement" in message:
                return confine.Confinement(**message["confinement"])
    raise SandboxError("the sandbox probe ended without an answer")


def confinement_ready(required: bool) -> bool:
    """Says in the log how the engine will be confined on this machine (a worker's start-up);
    False when it cannot be confined fully and ``required`` (BAERASE_SANDBOX_REQUIRED) says it must."""
    confinement = probe()
    if confinement.complete:
        log.info("engine sandbox: %s", confinement.describe())
        return True
    if required:
        log.error("cannot confine the engine fully on this machine (%s). See docs/deploy.md, \"Sandbox\"; "
                  "BAERASE_SANDBOX_REQUIRED=false runs uploaded models anyway, less confined",
                  confinement.describe())
        return False
    log.warning("the engine runs with an incomplete sandbox: %s (see docs/deploy.md, \"Sandbox\")",
                confinement.describe())
    return True


def run_child(job: dict, scratch: Path, limits: Limits, check_cancel: Callable[[], None] | None):
    """Starts the child on ``job`` and yields its messages as they come (a generator, so that
    progress reaches the caller while the child runs); kills it whenever the caller stops."""
    job = job | {"parent_pid": os.getpid(), "scratch": str(scratch)}
    read_end, write_end = os.pipe()
    job["channel"] = write_end
    child = subprocess.Popen([sys.executable, "-P", "-c", CHILD_START], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, pass_fds=(write_end,), cwd=scratch,
                             env=child_environment(scratch), start_new_session=True)
    os.close(write_end)
    try:
        try:
            child.stdin.write(json.dumps(job).encode())
            child.stdin.close()
        except BrokenPipeError:  # it died at once; its exit status says more below
            pass
        deadline = time.monotonic() + limits.wall_time_s if limits.wall_time_s else float("inf")
        buffer = b""
        while True:
            if select.select([read_end], [], [], POLL_S)[0]:
                chunk = os.read(read_end, 1 << 20)
                if not chunk:
                    break
                *lines, buffer = (buffer + chunk).split(b"\n")
                if len(buffer) > MAX_MESSAGE_BYTES:
                    raise SandboxError("the engine's process sent an oversized message")
                for line in lines:
                    message = json.loads(line)
                    if "confinement" in message:
                        report_confinement(confine.Confinement(**message["confinement"]), job)
                    yield message
            if check_cancel:
                check_cancel()
            if time.monotonic() > deadline:
                raise TimeLimitExceeded(f"the job ran longer than its time limit ({limits.wall_time_s:.0f} s)")
            if limits.memory_bytes and resident_bytes(child.pid) > limits.memory_bytes:
                raise ResourceLimitExceeded(f"the job used more than its memory limit "
                                            f"({limits.memory_bytes / 1024**3:.1f} GiB)")
        status = child.wait()
        if status == -signal.SIGXCPU:
            raise ResourceLimitExceeded(f"the job used more than its CPU-time limit ({limits.cpu_time_s:.0f} s)")
        if status != 0:
            raise SandboxError(f"the engine's process {exit_description(status)}")
    finally:
        os.close(read_end)
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)  # its group: anything it started goes too
            child.wait()


def report_confinement(confinement: confine.Confinement, job: dict) -> None:
    if confinement.complete:
        log.debug("engine sandbox: %s", confinement.describe())
    elif not job.get("probe"):
        log.warning("the engine runs with an incomplete sandbox: %s (see docs/deploy.md)",
                    confinement.describe())


def child_error(message: dict) -> Exception:
    kind, text = message["error"], message.get("message", "")
    if kind == "invalid_input":
        return InputError(text)
    if kind == "memory":
        return ResourceLimitExceeded("the job ran out of memory")
    return SandboxError(text)


def child_environment(scratch: Path) -> dict[str, str]:
    env = {name: os.environ[name] for name in CHILD_ENVIRONMENT if name in os.environ}
    # Caches (torch, CUDA kernels) and temporary files go to the scratch directory, the only
    # writable place besides the output; packages installed with pip --user stay importable.
    return env | {"HOME": str(scratch), "TMPDIR": str(scratch), "PYTHONUSERBASE": site.getuserbase(),
                  "PYTHONDONTWRITEBYTECODE": "1"}


def may_use_cuda(device: str) -> bool:
    if device == "cpu" or os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):  # it just exited
        pass
    return 0


def exit_description(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = str(-status)
        hint = " (out of memory?)" if status == -signal.SIGKILL else ""
        return f"was killed by signal {name}{hint}"
    return f"exited with status {status}"


# --- The child ---------------------------------------------------------------------------------

def child_main() -> None:
    job = json.loads(sys.stdin.read())
    confine.die_with_parent(job["parent_pid"])
    channel = os.fdopen(job["channel"], "w", buffering=1)

    def send(**message) -> None:
        channel.write(json.dumps(message) + "\n")

    confinement = confine.confine(read=[Path(p) for p in job["read"]] + python_paths(),
                                  write=[Path(job["scratch"])] + [Path(p) for p in job["write"]],
                                  memory_bytes=job.get("address_space_bytes"), cpu_time_s=job.get("cpu_time_s"))
    send(confinement=asdict(confinement))
    if job.get("probe"):
        return
    if job["require"] and not confinement.complete:
        send(error="sandbox", message=f"the engine sandbox is incomplete on this machine: {confinement.describe()}")
        return
    try:
        module, name = job["task"].split(":")
        function = getattr(importlib.import_module(module), name)
        result = function(job["argument"], lambda *step: send(progress=step))
    except InputError as e:
        send(error="invalid_input", message=str(e))
    except BaseException as e:
        if is_out_of_memory(e):
            send(error="memory")
            return
        traceback.print_exc()  # for the operator's log: the job's error names only the type
        send(error="internal", message=f"the engine failed ({type(e).__name__}); its traceback is in the log (stderr)")
    else:
        send(result=result)


def sanitize_task(argument: dict, progress: ProgressCallback) -> dict:
    from worker.sanitize.config import SanitizeConfig
    from worker.sanitize.pipeline import sanitize

    return sanitize(Path(argument["model"]), Path(argument["samples"]), Path(argument["out"]),
                    SanitizeConfig(**argument["config"]), progress)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    if type(error).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError: CUDA's
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def python_paths() -> list[Path]:
    """What the child reads code from: the interpreter with its standard library and site
    packages, and the `worker` package, but not the rest of the directory that holds it (in a
    checkout, that may hold baerase-data/ with the database and every job's files)."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
             *site.getsitepackages(), site.getusersitepackages(), str(CODE_ROOT / "worker")}
    return [Path(p) for p in paths]
