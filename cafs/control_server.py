"""The daemon side of the control socket (the protocol is described in cafs.control).

Owns: listening on `<store>/control.sock` inside the daemon's trio nursery, checking who
connects, running one admin request at a time and sending its progress and answer. Must not
decide what a command does (cafs.admin) nor be imported by the `cafs` command line: it needs
trio.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import trio

from cafs.control import (
    MAX_FDS,
    MAX_REQUEST,
    MAX_SOCKET_PATH,
    OUT_OF_DESCRIPTORS,
    OUT_OF_DESCRIPTORS_MESSAGE,
    READ_ONLY_COMMANDS,
    socket_path,
)
from cafs.errors import CafsError, StoreError, TooManyOpenFiles

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25

Handler = Callable[[str, dict[str, Any], list[IO[bytes]], Callable[[str, int, int], None]],
                   Awaitable[dict[str, Any]]]


async def serve_control(store: Path, handler: Handler) -> None:
    """Accept admin connections until cancelled. Runs inside the daemon's nursery."""
    path = socket_path(store)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        log.warning("store path too long for a control socket (%s): admin commands cannot "
                    "reach this daemon while it runs", path)
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket of a daemon that was killed
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        try:
            await listener.bind(str(path))
            os.chmod(path, 0o600)
            listener.listen(16)
        except OSError as exc:  # the mount works without it; only admin commands cannot reach us
            log.warning("cannot open the control socket %s: %s", path, exc)
            return
        one_at_a_time = trio.Lock()
        spare = _Spare()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        conn, _ = await listener.accept()
                    except OSError as exc:  # never the end of the daemon
                        if exc.errno in OUT_OF_DESCRIPTORS:
                            await _refuse_for_want_of_descriptors(listener, spare)
                        else:
                            log.warning("control socket: accept failed: %s", exc)
                            await trio.sleep(REFUSE_INTERVAL)
                        continue
                    nursery.start_soon(_serve_connection, conn, handler, one_at_a_time)
        finally:
            spare.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# How long the listener waits between refusals while out of descriptors: the waiting client
# stays queued rather than spinning the loop.
REFUSE_INTERVAL = 0.1
# How long a refused client may take to send its request and read the answer.
REFUSE_ANSWER_TIMEOUT = 5.0


class _Spare:
    """One descriptor held in reserve: when accept() fails for want of descriptors, freeing it
    lets the daemon accept the waiting client and tell it why, instead of leaving it hanging."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.take()

    def take(self) -> None:
        if self.fd is None:
            with contextlib.suppress(OSError):
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


async def _refuse_for_want_of_descriptors(listener: trio.socket.SocketType,
                                          spare: _Spare) -> None:
    log.warning("admin connection refused: %s", OUT_OF_DESCRIPTORS_MESSAGE)
    spare.close()
    try:
        conn = None
        with trio.move_on_after(REFUSE_INTERVAL):
            conn, _ = await listener.accept()  # the client waiting: the spare made room
        if conn is not None:
            with conn, trio.move_on_after(REFUSE_ANSWER_TIMEOUT):
                # Read the request first: closing with it unread would reset the connection
                # before the client reads the answer. Passed files find no room: dropped.
                with contextlib.suppress(CafsError, ValueError):
                    for fd in (await _receive_request(conn))[1]:
                        os.close(fd)
                await _send(conn, {"error": OUT_OF_DESCRIPTORS_MESSAGE, "errno": errno.EMFILE})
    except OSError:  # the room was taken meanwhile, or the client went away
        pass
    finally:
        spare.take()
    await trio.sleep(REFUSE_INTERVAL)


def _peer_uid(conn: trio.socket.SocketType) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


async def _receive_request(conn: trio.socket.SocketType) -> tuple[dict[str, Any], list[int]]:
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, ancillary, flags, _ = await conn.recvmsg(
            65536, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[:len(payload) - len(payload) % received.itemsize])
                fds += list(received)
        if flags & socket.MSG_CTRUNC:  # the kernel dropped passed files: no room for them
            for fd in fds:
                os.close(fd)
            raise TooManyOpenFiles(OUT_OF_DESCRIPTORS_MESSAGE)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            break
    request = json.loads(data)
    if not isinstance(request, dict) or not isinstance(request.get("command"), str) \
            or not isinstance(request.get("args", {}), dict):
        raise ValueError("malformed request")
    return request, fds


async def _send(conn: trio.socket.SocketType, message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        sent = await conn.send(data)
        data = data[sent:]


async def _serve_connection(conn: trio.socket.SocketType, handler: Handler,
                            one_at_a_time: trio.Lock) -> None:
    files: list[IO[bytes]] = []
    with conn:
        try:
            uid = _peer_uid(conn)
            if uid not in (0, os.getuid()):
                await _send(conn, {"error": "only root or the store's owner may run admin "
                                   "commands", "errno": errno.EACCES})
                return
            request, fds = await _receive_request(conn)
            files = [os.fdopen(fd, "r+b" if _writable(fd) else "rb", buffering=0)
                     for fd in fds]
            await _run_request(conn, handler, one_at_a_time, request, files)
        except TooManyOpenFiles as exc:
            with contextlib.suppress(OSError):
                await _send(conn, {"error": str(exc), "errno": exc.errno})
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("admin client went away: %s", exc)
        except ValueError as exc:
            with contextlib.suppress(OSError):
                await _send(conn, {"error": f"bad request: {exc}", "errno": errno.EINVAL})
        finally:
            with trio.CancelScope(shield=True):
                await _close_files(files)


async def _run_request(conn: trio.socket.SocketType, handler: Handler,
                       one_at_a_time: trio.Lock, request: dict[str, Any],
                       files: list[IO[bytes]]) -> None:
    command = request["command"]
    latest: list[Any] = []
    sent: list[Any] = []

    def progress(what: str, done: int, total: int) -> None:  # any thread
        latest[:] = [what, done, total]

    async def send_progress() -> None:
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            if latest and latest != sent:
                sent[:] = latest
                await _send(conn, {"progress": list(sent)})

    read_only = command in READ_ONLY_COMMANDS
    if not read_only and not await _take_turn(conn, one_at_a_time):
        log.info("admin command %s dropped: its client went away while it waited for its turn",
                 command)
        return  # the caller closes its files
    try:
        if not read_only:
            log.info("admin command %s %s", command, json.dumps(request.get("args", {})))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_progress)
            try:
                result = await handler(command, request.get("args", {}), files, progress)
                reply: dict[str, Any] = {"result": result}
            except CafsError as exc:
                log.info("admin command %s failed: %s", command, exc)
                reply = {"error": str(exc), "errno": exc.errno,
                         "store": isinstance(exc, StoreError)}
            except TypeError as exc:  # arguments that do not fit the command
                reply = {"error": f"bad request: {exc}", "errno": errno.EINVAL}
            except OSError as exc:  # the store's filesystem failed under the command
                log.warning("admin command %s failed: %s", command, exc)
                reason = OUT_OF_DESCRIPTORS_MESSAGE if exc.errno in OUT_OF_DESCRIPTORS else exc
                reply = {"error": f"{command} failed: {reason}", "errno": exc.errno or errno.EIO}
            except Exception as exc:  # a bug: answer, log it whole, keep serving
                log.exception("admin command %s failed", command)
                reply = {"error": f"{command} failed unexpectedly ({exc}); see the daemon log",
                         "errno": errno.EIO}
            nursery.cancel_scope.cancel()
        failed = await _close_files(files)  # an export is flushed before the client hears
        if failed is not None and "result" in reply:
            log.warning("admin command %s failed: closing its file: %s", command, failed)
            reply = {"error": f"{command} failed: {failed}", "errno": failed.errno or errno.EIO}
        if latest and latest != sent:  # the last step too: a terminal then shows 100%
            await _send(conn, {"progress": list(latest)})
        await _send(conn, reply)
    finally:
        if not read_only:
            one_at_a_time.release()


async def _take_turn(conn: trio.socket.SocketType, one_at_a_time: trio.Lock) -> bool:
    """Take the admin lock, or give up (False, without it) once the client has hung up: it
    sends nothing after its request, so a read that ends means it is gone. A queued command
    must not outlive its client: `cafs export -o - | cafs import -` on one store queues the
    import behind the export that fills its pipe, and after the user's ^C the daemon's copy
    of the import's input would keep the export blocked, and every admin command behind it,
    until unmount. Dropped, its descriptors close and the export fails with a broken pipe."""
    turn = False
    async with trio.open_nursery() as nursery:
        async def give_up_on_hang_up() -> None:
            with contextlib.suppress(OSError):
                while await conn.recv(4096):
                    pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(give_up_on_hang_up)
        await one_at_a_time.acquire()
        turn = True
        nursery.cancel_scope.cancel()
    return turn


async def _close_files(files: list[IO[bytes]]) -> OSError | None:
    """Close the caller's files in a worker thread, never on the event loop: one may be a file
    of this very mount (a bundle kept in a layer, an export written into one), and its close
    sends this daemon a FLUSH that only the event loop answers. The kernel waits for that
    answer even through SIGKILL: closed on the loop, the daemon and its mount hung for good.
    Returns the first close that failed (an export's last bytes not written)."""
    def close_all() -> OSError | None:
        failed = None
        for file in files:
            try:
                file.close()
            except OSError as exc:
                failed = failed or exc
        return failed
    return await trio.to_thread.run_sync(close_all)


def _writable(fd: int) -> bool:
    return (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) != os.O_RDONLY
