"""testbed.procs.free_port: each test bed's ports come from its own block below the ephemeral range."""

from __future__ import annotations

import itertools
import socket

from testbed import procs


def test_ports_come_from_this_beds_block_distinct_and_bindable(monkeypatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    first = procs.PORT_BASE + 3 * procs.PORT_BLOCK
    ports = [procs.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(first <= p < first + procs.PORT_BLOCK < 32768 for p in ports), ports
    with socket.socket() as s:
        s.bind((procs.LOOPBACK, ports[-1]))  # free when handed out


def test_a_port_in_use_is_skipped(monkeypatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw5")
    taken = procs.free_port()
    with socket.socket() as s:
        s.bind((procs.LOOPBACK, taken))
        s.listen()
        offset = taken - procs.PORT_BASE - 5 * procs.PORT_BLOCK
        monkeypatch.setattr(procs, "_handed_out", itertools.count(offset))  # the taken one comes next
        assert procs.free_port() != taken
