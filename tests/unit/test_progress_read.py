"""The progress reader's HTTP read (handlers/progress.py fetch_metrics) against real loopback servers: a
trainer port that trickles is cut off at the deadline, an oversized page is refused, the trainer's own
exporter is read."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from testbed.procs import free_port
from testbed.tcp import Serve, TcpServer, trickle

from sftjob_operator.handlers.progress import MetricsReadError, fetch_metrics, http_body
from sftjob_trainer.metrics import TrainerMetrics


@pytest.fixture
def server() -> Iterator[Callable[[Serve], TcpServer]]:
    started: list[TcpServer] = []

    def start(serve: Serve) -> TcpServer:
        started.append(TcpServer(serve))
        return started[-1]

    yield start
    for s in started:
        s.close()


@pytest.mark.timeout(30)
def test_a_trainer_port_that_trickles_one_byte_a_second_is_cut_off_at_the_deadline(server) -> None:
    # ~3 s. urllib's timeout bounds each socket read, so the old reader never returned from this server.
    stop = threading.Event()
    srv = server(trickle(stop, 1.0))
    t0 = time.monotonic()
    try:
        with pytest.raises(MetricsReadError, match=r"no complete response from 127\.0\.0\.1:\d+ within 2 s"):
            fetch_metrics("127.0.0.1", srv.port, deadline=2.0)
        took = time.monotonic() - t0
    finally:
        stop.set()
    assert srv.connections == 1
    assert took < 10, took  # bounded by the deadline, not by the (endless) page


@pytest.mark.timeout(30)
def test_headers_that_never_end_are_cut_off_too(server) -> None:
    # ~1.5 s: the status line arrives, then one header byte every 0.2 s (under any per-read timeout)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.0 200 OK\r\nX-Slow: ")
        while not stop.wait(0.2):
            conn.sendall(b"a")

    srv = server(serve)
    try:
        with pytest.raises(MetricsReadError, match=r"within 1\.5 s"):
            fetch_metrics("127.0.0.1", srv.port, deadline=1.5)
    finally:
        stop.set()


@pytest.mark.timeout(30)
def test_a_page_over_the_cap_is_refused(server) -> None:
    def serve(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 200_000)

    srv = server(serve)
    with pytest.raises(MetricsReadError, match=r"is over 100000 bytes"):
        fetch_metrics("127.0.0.1", srv.port, deadline=10, max_bytes=100_000)


@pytest.mark.timeout(30)
def test_a_server_that_keeps_the_connection_open_is_done_at_content_length(server) -> None:
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\nsft_train_step 7.0\r\n\r\n")
        stop.wait(30)  # never closes on its own

    srv = server(serve)
    try:
        assert fetch_metrics("127.0.0.1", srv.port, deadline=20) == "sft_train_step 7.0\r\n\r\n"
    finally:
        stop.set()


def test_refused_connection_and_non_200_are_read_errors(server) -> None:
    srv = server(lambda conn: conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
    with pytest.raises(MetricsReadError, match="HTTP 404"):
        fetch_metrics("127.0.0.1", srv.port, deadline=5)
    srv.close()
    with pytest.raises(MetricsReadError, match=rf"127\.0\.0\.1:{srv.port}"):
        fetch_metrics("127.0.0.1", srv.port, deadline=5)
    with pytest.raises(MetricsReadError, match="not an HTTP response"):
        http_body(b"garbage\r\n\r\n")


def test_the_trainers_own_exporter_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    free = free_port()  # from this test bed's own block
    monkeypatch.setenv("SFTJOB_METRICS_ADDR", "127.0.0.1")
    tm = TrainerMetrics("ns", "run", 0, free)
    tm.step.set(120)
    try:
        text = fetch_metrics("127.0.0.1", free, deadline=10)
    finally:
        tm.server.shutdown()
        tm.server.server_close()
    assert 'sft_train_step{namespace="ns",rank="0",sftjob="run"} 120.0' in text
