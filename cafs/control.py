"""The control socket: how `cafs` admin commands reach the daemon serving a store.

Owns: the protocol on `<store>/control.sock` and its client side. A client sends one JSON line
`{"command": ..., "args": {...}}`, with open file descriptors (an export's output, an import's
input) passed alongside by SCM_RIGHTS, so the daemon reads and writes exactly the files the
caller could open itself. The daemon answers with JSON lines: any number of
`{"progress": [what, done, total]}`, then one `{"result": {...}}` or
`{"error": message, "errno": N}`. A result is the JSON form of a typed result (cafs.admin
encodes it, the caller decodes it back): untyped dicts exist only on the wire.

Who may connect: the socket lives in the store directory (0700), and the daemon also checks the
peer's uid (root or the daemon's own user). Commands run one at a time.

Must not import trio, pyfuse3 or the daemon: every admin command loads this module. The daemon
side is cafs.control_server.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cafs.errors import CafsError, StoreError
from cafs.store import SOCKET_NAME

MAX_FDS = 2
MAX_REQUEST = 1 << 20
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
# Commands that only read the manifest, each a few index seeks and no await (`cafs ui`'s page
# queries): the daemon answers them at once, without queueing behind a long admin command (an
# import, gc) that holds the one-at-a-time lock, and without logging each one.
READ_ONLY_COMMANDS = frozenset({"browse"})
OUT_OF_DESCRIPTORS_MESSAGE = ("the daemon is out of file descriptors (too many files open in "
                              "the mount): close some, or raise its descriptor limit")


class AdminError(CafsError):
    """The daemon ran the command and it failed; carries the daemon's errno and message."""


def socket_path(store: Path) -> Path:
    return store / SOCKET_NAME


# -- client side --------------------------------------------------------------------------


def call(store: Path, command: str, args: dict[str, Any], files: list[int],
         progress: Callable[[str, int, int], None]) -> dict[str, Any]:
    """Run an admin command in the daemon serving `store`. Raises StoreError if no daemon
    answers, AdminError if the command failed."""
    path = socket_path(store)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with sock:
        _connect(sock, path)
        data = (json.dumps({"command": command, "args": args}) + "\n").encode()
        # The daemon may answer (a refused bundle) and close before this side is done
        # sending: the answer is then waiting to be read, so a broken pipe is no failure.
        with contextlib.suppress(BrokenPipeError):
            if files:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", files))]
                sent = sock.sendmsg([data], ancillary)
                if sent < len(data):
                    sock.sendall(data[sent:])
            else:
                sock.sendall(data)
        with sock.makefile("rb") as replies, contextlib.suppress(ConnectionResetError):
            for line in replies:
                message = json.loads(line)
                if "progress" in message:
                    progress(*message["progress"])
                elif "result" in message:
                    return message["result"]
                elif "error" in message:
                    kind = StoreError if message.get("store") else AdminError
                    raise kind(message["error"], message.get("errno", errno.EIO))
    raise StoreError("the daemon closed the connection without an answer (see its log)")


def _connect(sock: socket.socket, path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise StoreError(f"the store path is too long for its control socket ({path}); "
                         "unmount it to run admin commands")
    deadline = time.monotonic() + 5.0
    while True:
        try:
            sock.connect(str(path))
            return
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            # A daemon that has just started may not listen yet.
            if time.monotonic() > deadline:
                raise StoreError(f"the daemon serving {path.parent} does not answer on "
                                 f"{path} ({exc.strerror})") from None
            time.sleep(0.05)
