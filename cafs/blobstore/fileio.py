"""Small file helpers the blob store's modules share: whole writes, directory fsync, the
constant buffer of zeros that stands for a hole, reads that never wait for the disk, and the
read-ahead of sequentially read blob files.

Owns: nothing with state but a reader's last position (Sequential) and a shared descriptor's
users (SharedFd). Must not know about encodings, digests or the layout.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

# The unit of every copy and hash loop of the blob store: large enough that per-call costs
# vanish, small enough that memory stays flat whatever the blob's size.
CHUNK = 1 << 20
# Holes of a sparse temp (truncate -s 50G) are hashed from this instead of being read: the
# kernel would only copy zeros out, 50 GB of them. Compared by identity where that is a fast
# path (BlockSums), so it is one object for the whole package.
ZEROS = bytes(CHUNK)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite until all of `data` is written (a short write is not an error)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def fsync_dir(path: Path) -> None:
    """Make a rename into `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# How far ahead of a sequential reader the kernel is asked to read the blob file: FUSE READs
# come in at most 1 MiB; a few of them ahead keeps the disk busy while the daemon replies.
READ_AHEAD = 8 << 20


def pread_nowait(fd: int, length: int, offset: int) -> bytes:
    """pread that only copies from the page cache: BlockingIOError if the range would have to
    come from the disk, so the event loop never waits for it. Asks the kernel (RWF_NOWAIT)
    about the range's first and last byte, then reads it with one copy: the page cache fills
    a file's ranges whole (read-ahead), so a range cached at both ends is cached between."""
    if length <= 0:
        return b""
    probe = bytearray(1)
    for at in (offset, offset + length - 1):
        try:
            got = os.preadv(fd, [probe], at, os.RWF_NOWAIT)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                # A filesystem without RWF_NOWAIT (tmpfs answers EOPNOTSUPP): cannot tell, so
                # treat it as a read that may wait; the caller reads in a worker thread.
                raise BlockingIOError(errno.EAGAIN, "RWF_NOWAIT not supported here") from exc
            raise
        if got == 0 and at == offset:
            return b""  # at or past the end of the file
    return os.pread(fd, length, offset)


class Sequential:
    """Notices a reader going through a blob file in order and asks the kernel to read the file
    ahead (posix_fadvise WILLNEED starts the I/O and returns): the next READs then find the
    bytes in the page cache."""

    def __init__(self, fd: SharedFd) -> None:
        self._fd = fd
        self._next = -1  # where the last read ended
        self._advised = 0  # the file is asked for up to here

    def seen(self, offset: int, length: int) -> None:
        # A read from the start counts as sequential: most files are read whole, and a small
        # file is then read ahead entirely while its first READ is answered.
        sequential = offset in (self._next, 0)
        self._next = offset + length
        if sequential and self._next + READ_AHEAD // 2 > self._advised:
            start = max(self._advised, self._next)
            try:
                with self._fd as fd:
                    os.posix_fadvise(fd, start, READ_AHEAD, os.POSIX_FADV_WILLNEED)
            except OSError:
                return
            self._advised = start + READ_AHEAD


class SharedFd:
    """A blob file's descriptor that worker threads read through while the event loop may
    close it: closing waits for no one, the last read in progress closes it, and a read that
    starts after close gets EBADF. So a descriptor is never closed under a read (whose number
    could by then be another file's)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._users = 0
        self._closing = False
        self._lock = threading.Lock()

    def __enter__(self) -> int:
        with self._lock:
            if self._closing:
                raise OSError(errno.EBADF, "blob reader closed")
            self._users += 1
            return self._fd

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._users -= 1
            last = self._closing and not self._users
        if last:
            os.close(self._fd)

    @property
    def fd(self) -> int:
        """The descriptor itself, for set-up before any thread can share it."""
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            now = not self._users
        if now:
            os.close(self._fd)
