"""A write in progress: the temp file a blob is written into before it is published.

Owns: writing, reading, truncating and copying into one temp file (or, for a small write
through the mount, into memory until it outgrows MEMORY_FILE_LIMIT or the shared MemoryBudget:
then it spills into its file); hashing while writes arrive
in order (SHA-256 and the raw+xxh64 block sums at once, and zstd frames if given a FrameSink: in
a worker thread, see cafs.blobstore.stream); holes — runs of zeros stay holes and
are hashed from a constant buffer, never read. Must not name the temp, choose an encoding,
rename or fsync (the store does those).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cafs import crashpoints
from cafs.blobstore.api import BlobReader, read_chunks
from cafs.blobstore.fileio import CHUNK, ZEROS, pwrite_all
from cafs.blobstore.raw_xxh64 import BlockSums
from cafs.blobstore.stream import FrameSink, SerialFeed
from cafs.digest import Digest, digest_of_chunks
from cafs.errors import Corrupt

if TYPE_CHECKING:
    from cafs.blobstore.space import SpaceGuard


# A write through the mount stays in memory up to this size, while the budget allows: a small
# file then never has a temp file (a dedup hit, or a compressed blob, writes no file at all but
# the blob's).
MEMORY_FILE_LIMIT = 1 << 20
MEMORY_TOTAL_LIMIT = 64 << 20


class MemoryBudget:
    """The bytes every in-memory temp holds, bounded in all (thread-safe: a copy-on-write fills
    a temp from a worker thread)."""

    def __init__(self, limit: int = MEMORY_TOTAL_LIMIT) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self.used -= size


class _ContentSums:
    """SHA-256 and the block sums of the same bytes, fed together."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.blocks = BlockSums()

    def update(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        self.blocks.update(data)

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


class TempBlob:
    """A write in progress: a temp file in `tmp/`, hashed while writes arrive in order.

    SHA-256 is fed by writes that continue exactly where the hashed prefix ends. Any other write
    or truncate makes the prefix hash invalid; the digest is then computed from the file at the
    end. The in-order bytes are hashed (and given to `frame_sink`) in a worker thread while
    the next writes arrive; digest() waits for that. Not thread-safe: the owner serialises calls.
    """

    def __init__(self, fd: int, path: Path, space: SpaceGuard | None = None,
                 frame_sink: FrameSink | None = None, memory: MemoryBudget | None = None
                 ) -> None:
        # fd -1 with a budget: in memory (_mem) until it spills into a new file at `path`.
        self.fd = fd
        self.path = path
        self._budget = memory
        self._mem: bytearray | None = bytearray() if fd < 0 and memory is not None else None
        self._space = space
        self.size = 0
        self._sums = _ContentSums()
        self._hashed = 0  # bytes fed to _sums; -1 once out-of-order writes invalidated it
        self.frame_sink = frame_sink
        self._feed = SerialFeed(self._consume)

    def _consume(self, data: bytes | memoryview) -> None:
        """In the feed's thread, in order: what the prefix's bytes go to."""
        self._sums.update(data)
        sink = self.frame_sink
        if sink is not None:
            try:
                sink.update(data)
            except Exception:  # compressing is an optimisation: publish compresses instead
                sink.abandon()

    def _drop_frames(self) -> None:
        if self.frame_sink is not None:
            self.frame_sink.abandon()
            self.frame_sink = None

    def _invalidate(self) -> None:
        """The hashed prefix no longer describes the content: digest() re-reads the file."""
        self._feed.cancel()
        self._hashed = -1
        self._drop_frames()

    def write(self, offset: int, data: bytes) -> int:
        if self._space is not None:
            self._space.take(max(0, offset + len(data) - self.size))
        if not self._mem_resize(max(self.size, offset + len(data))):
            pwrite_all(self.fd, data, offset)
        else:
            assert self._mem is not None
            self._mem[offset:offset + len(data)] = data
        crashpoints.reached("after-temp-write")
        if self._hashed == offset:
            sink = self.frame_sink
            self._feed.feed(data, heavy=sink is not None and sink.completes_frame(len(data)))
            self._hashed += len(data)
        elif data and self._hashed != -1:
            self._invalidate()
        self.size = max(self.size, offset + len(data))
        return len(data)

    def read(self, offset: int, length: int) -> bytes:
        # Never past the content: publishing appends a checksum trailer to the same file.
        length = max(0, min(length, self.size - offset))
        # Read once: a publish in a worker thread may move the content to the file meanwhile
        # (materialize sets fd before it drops the memory).
        mem = self._mem
        if mem is not None:
            return bytes(mem[offset:offset + length])
        return os.pread(self.fd, length, offset)

    def truncate(self, size: int) -> None:
        if not self._mem_resize(size):
            os.ftruncate(self.fd, size)
        if size == self.size == self._hashed:
            pass  # nothing changes (O_TRUNC of a new temp): a stream goes on
        elif size == 0:
            self._feed.cancel()
            self._drop_frames()
            self._sums = _ContentSums()
            self._hashed = 0
        elif size != self._hashed and self._hashed != -1:
            self._invalidate()
        self.size = size

    def fill_from(self, reader: BlobReader) -> None:
        """Make this (empty) temp a copy of a blob: the start of a copy-on-write. Runs of
        zeros stay holes (a copy of a 50 GB sparse file takes no disk)."""
        offset = 0
        for chunk in read_chunks(reader):
            if len(chunk) == len(ZEROS) and chunk == ZEROS:  # memcmp: fast
                self._extend_with_zeros(offset, ZEROS)
            else:
                self.write(offset, chunk)
            offset += len(chunk)
        if offset < reader.size:
            raise Corrupt("blob shorter than recorded")

    def _extend_with_zeros(self, offset: int, zeros: bytes) -> None:
        """As write(offset, zeros) at the end of the content, leaving a hole."""
        assert offset == self.size
        if not self._mem_resize(offset + len(zeros)):
            os.ftruncate(self.fd, offset + len(zeros))
        if self._hashed == offset:
            # Holes are compressed from the temp (one shared zero frame), not streamed.
            self._drop_frames()
            self._feed.feed(zeros)
            self._hashed += len(zeros)
        self.size = offset + len(zeros)

    def chunks(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The content from `start` to `end` in pieces of at most 1 MiB; holes come from a
        constant buffer of zeros without a read."""
        end = self.size if end is None else min(end, self.size)
        offset = start
        data_at = offset
        while offset < end:
            if data_at <= offset:
                data_at = self._next_data(offset, end)
            if offset < data_at:  # in a hole: zeros up to the next data
                length = min(CHUNK - offset % CHUNK, data_at - offset)
                chunk = ZEROS if length == len(ZEROS) else bytes(length)
            else:
                length = min(CHUNK - offset % CHUNK, end - offset)
                chunk = self.read(offset, length)
                if len(chunk) != length:
                    raise Corrupt("temp file shorter than written")
            yield chunk
            offset += length

    def _next_data(self, offset: int, end: int) -> int:
        """Where data starts at or after `offset` (`end` if only a hole is left)."""
        if self._mem is not None:
            return offset  # memory holds no holes
        try:
            return min(end, os.lseek(self.fd, offset, os.SEEK_DATA))
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a hole up to the end of the file
                return end
            if exc.errno == errno.EINVAL:  # a filesystem without SEEK_DATA: read it all
                return offset
            raise

    def hole_length(self, start: int, limit: int) -> int:
        """How many bytes from `start` (at most `limit`) are surely zeros without data (a
        hole): 0 where data starts at `start`."""
        return self._next_data(start, start + limit) - start

    def fed_whole(self) -> bool:
        """Waits until the bytes fed so far are consumed; True if they are the whole content
        (then the hashes and the frame sink describe it)."""
        self._feed.wait()
        return self._hashed == self.size

    @property
    def streaming(self) -> bool:
        """Work on fed bytes is still going on in a worker thread (digest() would wait)."""
        return self._feed.busy

    def digest(self) -> Digest:
        """SHA-256 of the content; after out-of-order writes, read back (block sums too)."""
        self._feed.wait()
        if self._hashed != self.size:
            self._sums = _ContentSums()
            # The sums keep running afterwards: writes that append continue this hash.
            digest_of_chunks(self.chunks(), into=self._sums)
            self._hashed = self.size
        return Digest(self._sums.hexdigest())

    def append_block_sums(self) -> None:
        """Write the raw+xxh64 trailer after the content."""
        self.digest()  # makes the block sums whole, reading the file back if need be
        self.materialize()
        pwrite_all(self.fd, self._sums.blocks.trailer(self.size), self.size)

    @property
    def needs_rehash(self) -> bool:
        return self._hashed != self.size

    def discard(self) -> None:
        """Close and remove the temp; safe to call twice, and after a failed descriptor."""
        self._feed.cancel()
        self._drop_frames()
        if self._mem is not None:  # never had a file
            self._release_mem()
            return
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):  # the file goes anyway; a bad fd must not leak it
                os.close(fd)
        # Never raises: it runs after a publish has committed. A temp that cannot be removed
        # now is removed at the next start.
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    # -- in memory ----------------------------------------------------------------------------

    @property
    def in_memory(self) -> bool:
        return self._mem is not None

    def _mem_resize(self, size: int) -> bool:
        """Make the in-memory content `size` bytes long (zeros added) and say True; False if
        the temp is (or now goes) on disk: too big for memory, or the budget is spent."""
        mem = self._mem
        if mem is None:
            return False
        assert self._budget is not None
        grow = size - len(mem)
        if size > MEMORY_FILE_LIMIT or (grow > 0 and not self._budget.take(grow)):
            self.materialize()
            return False
        if grow > 0:
            mem.extend(bytes(grow))
        elif grow < 0:
            del mem[size:]
            self._budget.give(-grow)
        return True

    def materialize(self) -> None:
        """Move the content from memory into the temp's file (publish renames that file into
        place). ENOSPC or any I/O error leaves it in memory, as it was, and raises."""
        mem = self._mem
        if mem is None:
            return
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        try:
            with memoryview(mem) as view:
                pwrite_all(fd, view[:self.size], 0)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        self.fd = fd
        self._release_mem()

    def _release_mem(self) -> None:
        mem, self._mem = self._mem, None
        if mem is not None and self._budget is not None:
            self._budget.give(len(mem))
