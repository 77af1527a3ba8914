"""The suite's own network guard: tests stay offline unless they opt in."""

from __future__ import annotations

import _socket
import socket
from pathlib import Path

import pytest

from .conftest import NetworkBlockedError


def test_connections_off_the_machine_are_blocked() -> None:
    with pytest.raises(NetworkBlockedError, match="blocked in tests"):
        socket.create_connection(("203.0.113.7", 443), timeout=1)
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s, pytest.raises(NetworkBlockedError):
        s.connect_ex(("2001:db8::1", 443, 0, 0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(NetworkBlockedError):
        s.sendto(b"x", ("198.51.100.1", 53))


def test_name_lookups_are_blocked() -> None:
    with pytest.raises(NetworkBlockedError):
        socket.getaddrinfo("example.com", 443)


def test_loopback_is_allowed() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
    assert socket.getaddrinfo("localhost", 80)


def test_unix_sockets_are_allowed(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            conn, _ = server.accept()
            conn.close()


def test_the_guard_is_installed_by_default() -> None:
    assert socket.socket.connect is not _socket.socket.connect


@pytest.mark.network
def test_a_test_marked_network_is_not_guarded() -> None:
    assert socket.socket.connect is _socket.socket.connect
    assert socket.getaddrinfo.__module__ == "socket"
