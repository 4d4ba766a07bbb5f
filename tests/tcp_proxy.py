"""A loopback TCP proxy in front of a real server, for fault tests of the remote back ends.

The daemon is pointed at the proxy's port instead of the server's; the test then breaks the
path between them the ways networks break:

    pass     bytes flow both ways (the start, and `heal()`)
    refuse   nothing listens on the port: a new connection is refused at once; the connections
             already open keep working (a server that stopped accepting)
    hang     connections are accepted and nothing flows either way, old or new: a server or a
             network that stopped answering (the client's timeouts must end the wait)
    drop()   every open connection is reset now (RST); new ones work as the mode says

One thread accepts; one thread per connection pumps both directions with a short select, so a
change of mode takes effect within ~20 ms. Only for tests: no TLS, loopback only.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time

PASS, REFUSE, HANG = "pass", "refuse", "hang"
_TICK = 0.02


def _reset(sock: socket.socket) -> None:
    """Close with an RST, not a FIN: the peer's next read or write fails at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.mode = PASS
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        self._settled = threading.Event()
        self._listener: socket.socket | None = self._listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    # -- what tests call ------------------------------------------------------------------

    @property
    def url_host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def refuse(self) -> None:
        """Stop listening: new connections are refused (ECONNREFUSED) once this returns."""
        self._switch(REFUSE)

    def hang(self) -> None:
        """Accept, but let nothing through, on every connection old and new."""
        self._switch(HANG)

    def drop(self) -> None:
        """Reset every connection open now."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, server in pairs:
            _reset(client)
            _reset(server)

    def heal(self) -> None:
        """Back to passing bytes (connections held in `hang` resume where they were)."""
        self._switch(PASS)

    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._closed = True
        self._acceptor.join(timeout=2)
        self.drop()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside ---------------------------------------------------------------------------

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        listener.settimeout(_TICK * 5)
        return listener

    def _switch(self, mode: str) -> None:
        """Change mode and wait until the acceptor has opened or closed the port to match."""
        self._settled.clear()
        self.mode = mode
        if not self._settled.wait(timeout=5):
            raise RuntimeError("tcp proxy: the acceptor did not follow the mode change")

    def _accept_loop(self) -> None:
        """The only thread that opens, closes and accepts on the listening socket (a socket
        closed under a blocked accept() stays listening until that call returns)."""
        listener: socket.socket | None = self._listener
        while not self._closed:
            if self.mode == REFUSE and listener is not None:
                listener.close()
                listener = None
            elif self.mode != REFUSE and listener is None:
                listener = self._listen(self.port)
            self._settled.set()
            if listener is None:
                time.sleep(_TICK)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)  # the server itself is down: the client sees a reset
                continue
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
        if listener is not None:
            listener.close()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peer = {client: server, server: client}
        try:
            while True:
                if self.mode == HANG:
                    time.sleep(_TICK)
                    continue
                readable, _, _ = select.select([client, server], [], [], _TICK)
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:  # one side closed: close both
                        return
                    peer[sock].sendall(data)
        except (OSError, ValueError):  # reset by drop() (ValueError: a closed socket's fd)
            return
        finally:
            with self._lock:
                if (client, server) in self._pairs:
                    self._pairs.remove((client, server))
            client.close()
            server.close()
