"""Helpers of the tests that start processes and wait for them."""

import socket
import time

# Hang guards only: nothing is asserted about how long things take.
PATIENCE_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str):
    """Polls ``condition`` until it returns something true, and returns that."""
    deadline = time.monotonic() + PATIENCE_S
    while not (result := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)
    return result
