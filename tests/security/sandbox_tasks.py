"""Tasks that tests/security/test_sandbox.py runs in the sandbox, in place of the engine: each
tries something a model that got past the operation allow-list might, and says what happened.
``sandbox_children`` is for the tests themselves."""

import os
import socket
import time
from pathlib import Path


def outcome(action) -> str:
    try:
        action()
    except OSError as e:
        return type(e).__name__
    return "done"


def read(argument: dict, progress) -> dict:
    text = {}

    def read_one(path: str) -> None:
        text[path] = Path(path).read_text()

    return {"outcomes": {path: outcome(lambda p=path: read_one(p)) for path in argument["paths"]}, "text": text}


def write(argument: dict, progress) -> dict:
    return {path: outcome(lambda p=path: Path(p).write_text("written by the sandboxed task"))
            for path in argument["paths"]}


def environment(argument: dict, progress) -> dict:
    def parent_environ() -> None:
        environ["parent"] = Path(f"/proc/{os.getppid()}/environ").read_bytes().decode(errors="replace")

    environ = {}
    return {"own": dict(os.environ), "parent": outcome(parent_environ), "parent_text": environ.get("parent", "")}


def connect(argument: dict, progress) -> dict:
    def tcp() -> None:
        socket.create_connection(("127.0.0.1", argument["port"]), timeout=5).close()

    def unix() -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(argument["unix_path"])

    return {"tcp": outcome(tcp), "unix": outcome(unix)}


def sleep(argument: dict, progress) -> None:
    for step in range(1_000_000):
        progress("recovery", 0.0, f"step {step}")
        time.sleep(0.1)


def allocate(argument: dict, progress) -> int:
    block = bytearray(argument["bytes"])
    for i in range(0, len(block), 4096):  # touch every page, so that it is resident
        block[i] = 1
    time.sleep(argument.get("hold_s", 0))
    return len(block)


def burn_cpu(argument: dict, progress) -> None:
    while True:
        pass


def sandbox_children() -> list[int]:
    """Live sandbox processes that the calling (test) process started."""
    children = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        children += (task / "children").read_text().split()
    alive = []
    for pid in children:
        try:
            if "worker.sandbox" in Path(f"/proc/{pid}/cmdline").read_text():
                alive.append(int(pid))
        except OSError:  # it exited meanwhile
            pass
    return alive
