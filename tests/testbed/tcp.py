"""Tiny real TCP servers for tests of readers that must not block: each connection gets `serve(conn)` in a
thread (e.g. `trickle`: a valid HTTP response, one byte at a time, with no end)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

Serve = Callable[[socket.socket], None]


class TcpServer:
    """Listens on `host` (a free port unless given) and answers every connection with `serve(conn)`."""

    def __init__(self, serve: Serve, host: str = "127.0.0.1", port: int = 0):
        self.serve = serve
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        # OSError: the reader hung up, which is what a cut-off looks like from here
        with conn, contextlib.suppress(OSError):
            self.serve(conn)

    def close(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not, on Linux)
        self.sock.close()


def trickle(stop: threading.Event, every: float) -> Serve:
    """A valid /metrics response, one byte every `every` seconds, endless (until `stop` is set)."""

    def serve(conn: socket.socket) -> None:
        conn.recv(4096)
        page = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"# trickle\n" * 100_000
        for byte in page:
            if stop.wait(every):
                return
            conn.sendall(bytes([byte]))

    return serve
