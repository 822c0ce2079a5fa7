"""Helpers of the API tests: processes to start and wait for, and problem+json answers."""

import socket
import threading
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


class CuttableProxy:
    """A TCP proxy in front of a server that a test can cut (every connection dropped, new ones
    refused, as when the server's host drops off the network) and restore."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.port, self.sockets = target, free_port(), []
        self.restore()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self.accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        close(self.listener)
        for s in self.sockets:
            close(s)
        self.sockets.clear()

    def accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        close(source)
        close(sink)


def close(s: socket.socket) -> None:
    """Closes a socket for good, waking a thread blocked reading from it or accepting on it
    (close alone would leave that thread, and the connection, running)."""
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already
        pass
    s.close()


def assert_problem(response, status: int, *words: str) -> dict:
    """An RFC 9457 problem+json answer with this status whose detail names every word."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    for word in words:
        assert word in body["detail"], body["detail"]
    return body
