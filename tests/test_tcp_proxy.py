"""The fault proxy the back-end tests stand in front of PostgreSQL and S3: each mode does what
it says to a plain echo server, so a fault test that passes did see its fault."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.tcp_proxy import TcpProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        # The drop mode resets the proxy's side: this echo's peer is gone, nothing to report.
        with conn, contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def _echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def _connect(proxy: TcpProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=1)


def test_modes(echo_port: int) -> None:
    with TcpProxy(echo_port) as proxy:
        sock = _connect(proxy)
        assert _echo(sock, b"hello") == b"hello"

        proxy.hang()
        sock.sendall(b"lost?")
        with pytest.raises(TimeoutError):
            sock.recv(10)
        fresh = _connect(proxy)  # accepted while hung, but silent too
        fresh.sendall(b"x")
        with pytest.raises(TimeoutError):
            fresh.recv(10)
        proxy.heal()  # held bytes flow again
        assert sock.recv(10) == b"lost?"
        assert fresh.recv(10) == b"x"

        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            _connect(proxy)
        assert _echo(sock, b"still") == b"still"  # open connections keep working

        proxy.drop()
        with pytest.raises(OSError):
            sock.sendall(b"gone")
            if not sock.recv(10):
                raise ConnectionResetError
        proxy.heal()
        again = _connect(proxy)
        assert _echo(again, b"back") == b"back"
        for s in (sock, fresh, again):
            s.close()
