"""Small file helpers the blob store's modules share: whole writes, directory fsync, the
constant buffer of zeros that stands for a hole, reads that never wait for the disk, the
read-ahead of sequentially read blob files, and reads past the page cache (O_DIRECT) into
aligned buffers in worker threads.

Owns: nothing with state but a reader's last position (Sequential), a shared descriptor's users
(SharedFd), and the direct reads' buffers, threads and descriptor count (DirectReads). Must not
know about encodings, digests or the layout.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

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

    def follows(self, offset: int) -> bool:
        """A read at `offset` goes on in order (a read from the start counts: most files are
        read whole)."""
        return offset in (self._next, 0)

    def seen(self, offset: int, length: int) -> None:
        # A read from the start counts as sequential: most files are read whole, and a small
        # file is then read ahead entirely while its first READ is answered.
        sequential = self.follows(offset)
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

    def __init__(self, fd: int, on_close: Callable[[], None] | None = None) -> None:
        self._fd = fd
        self._users = 0
        self._closing = False
        self._lock = threading.Lock()
        self._on_close = on_close  # called once the descriptor is closed

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
            self._close_now()

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
            self._close_now()

    def _close_now(self) -> None:
        os.close(self._fd)
        if self._on_close is not None:
            self._on_close()


# Direct reads (O_DIRECT) go in units of this alignment (offset, length and buffer address):
# the logical block size of any disk the store may sit on.
DIRECT_ALIGN = 4096
# The unit of a direct read: one preadv the kernel splits into several disk requests at once.
DIRECT_CHUNK = 4 << 20


class DirectReads:
    """Reads of blob files past the page cache, for readers that stream a large cold blob.

    A buffered read of a cold file costs the kernel a page-cache page per 4 KiB (allocated,
    filled, put on its lists, later reclaimed) and then a copy into a new buffer: most of the
    daemon's CPU in a cold sequential read (measured: 0.9-1.4 s of CPU per GiB read and checked,
    against 0.2-0.3 s with O_DIRECT into a reused buffer). The kernel keeps what the FUSE client
    read in the mount's own page cache anyway: a second copy in the blob file's is wasted.

    Owns a few worker threads, page-aligned buffers of DIRECT_CHUNK bytes (reused: a new
    buffer's pages cost a fault each), and the count of the extra descriptors that direct reads
    hold (at most `max_streams`: the daemon's descriptor reserve covers them).

    A buffer's bytes go to the FUSE reply without a copy (as memoryviews): a retired buffer is
    reused only once nothing refers to it any more, which CPython's reference count says
    exactly (every memoryview of a buffer, and every export of one, holds a reference to it)."""

    def __init__(self, threads: int = 2, max_streams: int = 4, max_buffers: int = 12) -> None:
        self._threads = threads
        self._max_streams = max_streams
        self._max_buffers = max_buffers
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._free: list[mmap.mmap] = []
        self._retired: list[mmap.mmap] = []  # handed out; free once unreferenced
        self.streams = 0

    def spare(self) -> bool:
        """Whether another stream may start now."""
        with self._lock:
            return self.streams < self._max_streams

    def open(self, fd: int) -> SharedFd | None:
        """A descriptor of the same file as `fd` that reads past the page cache; None if the
        streams' budget is spent or the filesystem cannot (tmpfs refuses O_DIRECT)."""
        with self._lock:
            if self.streams >= self._max_streams:
                return None
            self.streams += 1
        try:
            direct = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            self._closed()
            return None
        return SharedFd(direct, on_close=self._closed)

    def _closed(self) -> None:
        with self._lock:
            self.streams -= 1

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="cafs-direct")
            return self._pool.submit(fn, *args)

    def read(self, fd: SharedFd, length: int, offset: int) -> tuple[mmap.mmap, int]:
        """A buffer holding `length` bytes read at `offset` (a multiple of DIRECT_ALIGN) from
        the direct descriptor, and how many bytes it got (fewer at the file's end). The caller
        owns the buffer and gives it back with retire()."""
        aligned = -(-length // DIRECT_ALIGN) * DIRECT_ALIGN
        if aligned > DIRECT_CHUNK or offset % DIRECT_ALIGN:
            raise ValueError("a direct read is at most DIRECT_CHUNK bytes at an aligned offset")
        buffer = self._take()
        try:
            with fd as direct, memoryview(buffer) as view:
                got = os.preadv(direct, [view[:aligned]], offset)
        except BaseException:
            self.retire(buffer)
            raise
        return buffer, min(got, length)

    def _take(self) -> mmap.mmap:
        with self._lock:
            for index in range(len(self._retired) - 1, -1, -1):
                # Referenced by the list and by getrefcount's argument only: no memoryview
                # of it is left anywhere.
                if sys.getrefcount(self._retired[index]) <= 2:
                    self._free.append(self._retired.pop(index))
            if self._free:
                return self._free.pop()
        # Private (mmap's default is shared memory, which gets no huge pages), and huge pages:
        # the kernel pins the buffer's pages for every direct read into it and every FUSE
        # reply out of it, page by page (measured: pinning 4 KiB pages of shared memory took
        # 15% of the daemon's CPU in a cold sequential read).
        buffer = mmap.mmap(-1, DIRECT_CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(AttributeError, OSError):
            buffer.madvise(mmap.MADV_HUGEPAGE)
        return buffer

    def retire(self, buffer: mmap.mmap) -> None:
        """The caller is done with `buffer`; views of it may still be in use (a reply)."""
        with self._lock:
            if len(self._free) + len(self._retired) < self._max_buffers:
                self._retired.append(buffer)
            # else: dropped; freed when its last view goes


direct_reads = DirectReads()
