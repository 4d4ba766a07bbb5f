"""The "raw+xxh64" encoding: the content as it is, checked block by block. Writer and reader.

Format (all integers little-endian):
    content        the bytes as they are: `head -c SIZE blob` yields the content
    block sums     one u64 XXH64 per CHECK_BLOCK_SIZE block of content (the last may be short)
    footer         u64 content size, u32 block size, u32 magic 0xCAF5B10C
A read fetches the whole blocks it covers and checks each against its sum, so a flipped byte
gives EIO, never wrong bytes. It is what incompressible content (and anything too small to
compress) is stored as.

Writing is in place: a temp feeds its bytes to BlockSums as they arrive (or when it re-hashes
after out-of-order writes), and the trailer is appended to the temp itself before publish.

Owns: the format, the block sums and the checked reader. Must not decide which encoding a blob
gets, or know about the layout.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future

import xxhash

from cafs.blobstore.fileio import (
    DIRECT_CHUNK,
    ZEROS,
    Sequential,
    SharedFd,
    direct_reads,
    pread_nowait,
)
from cafs.digest import Digest
from cafs.errors import Corrupt

# A block is what one checksum covers. 64 KiB: FUSE reads (128 KiB, aligned) cover whole
# blocks, and the table costs 128 KiB per GiB.
CHECK_BLOCK_SIZE = 1 << 16
_BLOCK_SUM = struct.Struct("<Q")
_FOOTER = struct.Struct("<QII")  # content size, block size, magic
_MAGIC = 0xCAF5B10C
_ZERO_BLOCK_SUM = xxhash.xxh64_intdigest(bytes(CHECK_BLOCK_SIZE))
# A blob at least this large that is read in order from a part the page cache lacks streams:
# its next STREAM_AHEAD chunks (of DIRECT_CHUNK bytes) are read past the page cache and checked
# in worker threads, ahead of the READs that will ask for them (see _Stream). Four: with two,
# 53 of the 1,024 READs of a cold 1 GiB read found their chunk still being read (each then
# waits in a thread and its bytes are copied); with four, 4-16 (loaded machine, load 5-6).
STREAM_MIN_SIZE = 8 << 20
STREAM_AHEAD = 4
# Chunks a stream keeps behind the furthest READ it served. The kernel's read-ahead sends READs
# out of order (measured: a READ up to 14 MiB behind one already served, when the kernel skips
# read-ahead it finds congested and asks for those pages later); one that falls behind what is
# kept is read through the page cache, and the stream goes on. Only a READ outside
# [kept .. next to submit] by more than STREAM_BEHIND chunks is a jump that ends it.
STREAM_KEEP = 2
STREAM_BEHIND = 8


def checked_raw_size(size: int) -> int:
    """Bytes on disk of a raw+xxh64 blob of `size` content bytes."""
    blocks = -(-size // CHECK_BLOCK_SIZE)
    return size + blocks * _BLOCK_SUM.size + _FOOTER.size


class BlockSums:
    """The writer: XXH64 of each CHECK_BLOCK_SIZE block of bytes fed in order."""

    def __init__(self) -> None:
        self.sums: list[int] = []
        self._hasher = xxhash.xxh64()
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        if data is ZEROS and self._filled == 0:
            # A hole's zeros, block-aligned: their sums are a constant.
            self.sums += [_ZERO_BLOCK_SUM] * (len(data) // CHECK_BLOCK_SIZE)
            return
        view = memoryview(data)
        while view:
            take = min(len(view), CHECK_BLOCK_SIZE - self._filled)
            self._hasher.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == CHECK_BLOCK_SIZE:
                self.sums.append(self._hasher.intdigest())
                self._hasher.reset()
                self._filled = 0

    def trailer(self, size: int) -> bytes:
        """The table and footer that follow `size` content bytes on disk."""
        sums = self.sums + ([self._hasher.intdigest()] if self._filled else [])
        table = b"".join(_BLOCK_SUM.pack(value) for value in sums)
        return table + _FOOTER.pack(size, CHECK_BLOCK_SIZE, _MAGIC)


class CheckedRawReader:
    """The reader, a BlobReader: reads fetch whole blocks and check each against its XXH64."""

    def __init__(self, fd: int, digest: Digest) -> None:
        self._fd = SharedFd(fd)
        self._digest = digest
        file_size = os.fstat(fd).st_size
        if file_size < _FOOTER.size:
            raise Corrupt(f"blob {digest}: too short for its checksum footer")
        size, block_size, magic = _FOOTER.unpack(
            os.pread(fd, _FOOTER.size, file_size - _FOOTER.size))
        if magic != _MAGIC or block_size != CHECK_BLOCK_SIZE \
                or file_size != checked_raw_size(size):
            raise Corrupt(f"blob {digest}: checksum footer does not match the file")
        self.size = size
        self._sequential = Sequential(self._fd)
        self._stream: _Stream | None = None
        self._streams = size >= STREAM_MIN_SIZE  # False once streaming is not possible

    def read(self, offset: int, length: int) -> bytes:
        stream = self._stream
        if stream is not None:
            data = stream.read(offset, length, wait=True)
            if data is not None:
                return bytes(data)  # (a memoryview of a stream's buffer: see read_nowait)
            if stream.behind(offset):  # a late READ of read-ahead: the stream goes on
                return self._read(offset, length, os.pread)  # type: ignore[arg-type]
            self._end_stream(stream)  # a read elsewhere: the page cache serves it
        self._sequential.seen(offset, length)
        return self._read(offset, length, os.pread)  # type: ignore[arg-type]

    def read_nowait(self, offset: int, length: int) -> bytes | memoryview | None:
        """The bytes if the page cache holds them (and their sums) now, or a stream has read
        them ahead (then a read-only memoryview of its buffer, valid for as long as it is
        referenced); None if reading them would wait for the disk: then the caller reads in a
        worker thread. A large blob read in order from a part the page cache lacks starts
        streaming here."""
        stream = self._stream
        if stream is not None:
            if stream.covers(offset, length):
                return stream.read(offset, length, wait=False)
            if stream.behind(offset):
                return None  # a late READ of read-ahead: read() serves it, the stream goes on
            self._end_stream(stream)
        try:
            data = self._read(offset, length, pread_nowait)
        except BlockingIOError:
            if self._streams and offset < self.size and self._sequential.follows(offset):
                self._start_stream(offset)
            return None
        self._sequential.seen(offset, length)
        return data

    def _start_stream(self, offset: int) -> None:
        if not direct_reads.spare():
            return  # as many streams as allowed run now: the page cache, and later again
        direct = direct_reads.open(self._fd.fd)
        if direct is None:
            self._streams = False  # no O_DIRECT on this filesystem: the page cache
            return
        self._stream = _Stream(self, direct, offset // DIRECT_CHUNK)

    def _end_stream(self, stream: _Stream) -> None:
        if self._stream is stream:
            self._stream = None
        stream.close()

    def _read(self, offset: int, length: int, pread: Callable[[int, int, int], bytes]) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // CHECK_BLOCK_SIZE, (end - 1) // CHECK_BLOCK_SIZE
        start = first * CHECK_BLOCK_SIZE
        stop = min((last + 1) * CHECK_BLOCK_SIZE, self.size)
        with self._fd as fd:
            data = pread(fd, stop - start, start)
            sums = self._sums(first, last, pread, fd)
        if len(data) != stop - start:
            raise Corrupt(f"blob {self._digest}: shorter than its footer says")
        self._check(memoryview(data), first, sums)
        if offset == start and end == stop:
            return data
        return data[offset - start:end - start]

    def _sums(self, first: int, last: int, pread: Callable[[int, int, int], bytes],
              fd: int) -> bytes:
        """The sums of blocks first..last, read from the table after the content."""
        sums = pread(fd, (last - first + 1) * _BLOCK_SUM.size,
                     self.size + first * _BLOCK_SUM.size)
        if len(sums) != (last - first + 1) * _BLOCK_SUM.size:
            raise Corrupt(f"blob {self._digest}: shorter than its footer says")
        return sums

    def _check(self, view: memoryview, first: int, sums: bytes) -> None:
        """Corrupt unless each block of `view` (block `first` onwards) matches its sum."""
        for index, (expected,) in enumerate(_BLOCK_SUM.iter_unpack(sums)):
            block = view[index * CHECK_BLOCK_SIZE:(index + 1) * CHECK_BLOCK_SIZE]
            if xxhash.xxh64_intdigest(block) != expected:
                raise Corrupt(f"blob {self._digest}: block {first + index} fails its checksum")

    def load_chunk(self, direct: SharedFd, index: int) -> _Chunk:
        """Chunk `index` (DIRECT_CHUNK bytes from index * DIRECT_CHUNK) read past the page
        cache through `direct` and checked (a worker thread of the stream runs this)."""
        start = index * DIRECT_CHUNK
        stop = min(start + DIRECT_CHUNK, self.size)
        first, last = start // CHECK_BLOCK_SIZE, (stop - 1) // CHECK_BLOCK_SIZE
        with self._fd as fd:
            sums = self._sums(first, last, os.pread, fd)  # type: ignore[arg-type]
        buffer, got = direct_reads.read(direct, stop - start, start)
        try:
            if got != stop - start:
                raise Corrupt(f"blob {self._digest}: shorter than its footer says")
            with memoryview(buffer) as whole:
                self._check(whole[:got], first, sums)
            return _Chunk(buffer, got)
        except BaseException:
            direct_reads.retire(buffer)
            raise

    def idle(self) -> None:
        """A stream ends: its buffers and direct descriptor go."""
        stream = self._stream
        if stream is not None:
            self._end_stream(stream)

    def close(self) -> None:
        self.idle()
        self._fd.close()


class _Chunk:
    """A stream's chunk, read and checked: its bytes are a read-only view of a direct read's
    buffer, handed out in slices until the stream drops it (retire)."""

    def __init__(self, buffer: mmap.mmap, length: int) -> None:
        self.buffer = buffer
        self.view = memoryview(buffer).toreadonly()[:length]
        self.retired = False

    def retire(self) -> None:
        """Slices handed out stay valid; the buffer is reused once none is left."""
        if not self.retired:
            self.retired = True
            self.view.release()
            direct_reads.retire(self.buffer)


class _Stream:
    """The chunks of a blob being read ahead of a reader going through it in order: past the
    page cache, checked, in worker threads (fileio.DirectReads). A READ the stream covers takes
    its bytes from here; one elsewhere (a jump) ends the stream, and reads go through the page
    cache again. A chunk that fails its checks fails the READs that need it (Corrupt: EIO);
    any other error of a direct read ends the stream and the page cache path reads again."""

    def __init__(self, reader: CheckedRawReader, direct: SharedFd, first: int) -> None:
        self._reader = reader
        self._direct = direct
        # READs in worker threads and on the event loop; reentrant: a dropped chunk's read
        # that is done already retires it at once, under the lock (_drop)
        self._lock = threading.RLock()
        self._chunks: dict[int, Future[_Chunk]] = {}
        self._next = first  # the next chunk to submit
        self._furthest = first  # the furthest chunk a READ started in
        self._end = -(-reader.size // DIRECT_CHUNK)  # chunks in the blob
        self._closed = False

    def covers(self, offset: int, length: int) -> bool:
        """A read at `offset` is the stream's: it starts in a chunk submitted (and not yet
        left behind) or in the next one to submit."""
        index = offset // DIRECT_CHUNK
        with self._lock:
            low = min(self._chunks, default=self._next)
            return (not self._closed and low <= index <= self._next
                    and offset < self._reader.size)

    def behind(self, offset: int) -> bool:
        """A read at `offset` is a late one of the stream's (read-ahead the kernel asked for
        out of order): before the chunks it keeps, by at most STREAM_BEHIND chunks."""
        index = offset // DIRECT_CHUNK
        with self._lock:
            low = min(self._chunks, default=self._next)
            return not self._closed and low - STREAM_BEHIND <= index < low

    def read(self, offset: int, length: int, *, wait: bool) -> bytes | memoryview | None:
        """The bytes, once their chunks are read and checked; without `wait`, None while one
        is still being read. Also None (even waiting) if the read is not the stream's."""
        if not self.covers(offset, length):
            return None
        end = min(offset + length, self._reader.size)
        first, last = offset // DIRECT_CHUNK, (end - 1) // DIRECT_CHUNK
        futures = self._window(first, last)
        if not wait and not all(future.done() for future in futures):
            return None
        chunks = []
        for future in futures:
            try:
                chunks.append(future.result())
            except Corrupt:
                raise
            except Exception:  # not the blob's fault (the direct read failed): page cache
                self.close()
                return None
        with self._lock:  # a chunk is retired under the lock: its view stays valid here
            if any(chunk.retired for chunk in chunks):
                return None
            parts = []
            for index, chunk in zip(range(first, last + 1), chunks, strict=True):
                base = index * DIRECT_CHUNK
                parts.append(chunk.view[max(offset, base) - base:min(end, base + DIRECT_CHUNK)
                                        - base])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _window(self, first: int, last: int) -> list[Future[_Chunk]]:
        """The futures of chunks first..last, submitting what is missing and the chunks
        STREAM_AHEAD past them; chunks more than STREAM_KEEP before the furthest READ are
        dropped (read already: the kernel keeps them in the mount's page cache)."""
        with self._lock:
            self._furthest = max(self._furthest, first)
            for index in [index for index in self._chunks
                          if index < self._furthest - STREAM_KEEP]:
                self._drop(self._chunks.pop(index))
            stop = min(self._end, last + 1 + STREAM_AHEAD)
            for index in range(first, stop):
                if index not in self._chunks:
                    self._chunks[index] = direct_reads.submit(
                        self._reader.load_chunk, self._direct, index)
            self._next = max(self._next, stop)
            return [self._chunks[index] for index in range(first, last + 1)]

    def _drop(self, future: Future[_Chunk]) -> None:
        if not future.cancel():
            future.add_done_callback(self._retire)  # now, or once its read is done

    def _retire(self, future: Future[_Chunk]) -> None:
        if not future.cancelled() and future.exception() is None:
            with self._lock:  # never while a READ slices its view (read)
                future.result().retire()

    def close(self) -> None:
        """Ends the stream: chunks not started are cancelled, the others' buffers retired
        (at once or when their read ends); a running read keeps the direct descriptor open
        until it is done (SharedFd)."""
        with self._lock:
            self._closed = True
            for future in self._chunks.values():
                self._drop(future)
            self._chunks.clear()
        self._direct.close()
