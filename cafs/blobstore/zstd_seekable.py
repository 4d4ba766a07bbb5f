"""The "zstd" encoding: zstd's seekable format, with a checksum per frame. Writer and reader.

Format (zstd's seekable format, integers little-endian):
    frames         independent zstd frames of at most `frame_size` uncompressed bytes each
    seek table     a skippable frame (magic 0x184D2A5E, u32 length) holding, per frame,
                   u32 compressed size, u32 decompressed size, u32 low 32 bits of the XXH64 of
                   the frame's uncompressed bytes; then u32 frame count, u8 descriptor (0x80:
                   checksums present), u32 seekable magic 0x8F92EAB1
A read decompresses only the frames it covers and checks each frame's checksum, so a flipped
byte gives EIO, never wrong bytes. The file is an ordinary .zst stream: `zstd -d < blob` yields
the content.

Owns: the format, the decision whether compressing is worthwhile, the compression thread pool
and the cache of decompressed frames readers share. It is the only module that imports
zstandard. Must not know about the layout, or rename or fsync anything (publish does that).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import itertools
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import xxhash
import zstandard

from cafs.blobstore.fileio import SharedFd, pread_nowait, pwrite_all
from cafs.blobstore.temp import TempBlob
from cafs.digest import Digest
from cafs.errors import Corrupt
from cafs.lru import Lru

# 64 KiB: a random 4 KiB read decompresses and checks a whole frame, and that was the largest
# part of its cost at 128 KiB (perf on the daemon: ~90-100 us of ~250 us per cold read; a
# 64 KiB frame takes half that), while at zstd's level 3 text compresses no worse (measured on
# CSV and JSON shards: 0.39-0.44 of the size at 128 KiB against 0.41-0.45 at 1 MiB; the
# bench's CSV: 0.390 at 64 KiB, 0.398 at 128 KiB). 32 KiB was measured and not taken: a frame
# decompresses and checks in 37 us instead of 68 (in-process), but on the mount the daemon's
# CPU per cold random read moved little (medians -14 to +5 us in four interleaved runs) while a
# cold sequential read of a 256 MiB text artifact took 10-27% longer, even with read-ahead in
# tasks of several frames; 16 KiB did no better on random reads and stored 0.42 instead of 0.40
# of the text. Blobs written with other frame sizes stay readable: the seek table gives each
# frame's size.
DEFAULT_FRAME_SIZE = 64 << 10
# A run of zeros without data (a hole of the temp, e.g. from truncate) of a frame or more is
# one frame of up to this many bytes, ending on a frame boundary: a zero frame is ~26 bytes and
# a seek-table entry 12 whatever its length, so a 4 GiB hole stores 0.6 MB (2.1 MB in 64 KiB
# frames; 4.2 MB in 32 KiB ones, over the 0.05% a hole may cost). A random read inside one
# costs what one in a 64 KiB frame of zeros did (~120 us of the daemon's CPU per cold 4 KiB
# read, against ~260 us with 1 MiB hole frames, which store 0.25 MB).
HOLE_FRAME_SIZE = 256 << 10
# A sequential reader gets the frames of the next this many bytes decompressed and checked
# ahead, in worker threads, while the kernel still asks for the current ones.
READ_AHEAD_BYTES = 2 << 20
# A frame this small is decompressed on the event loop when its compressed bytes are cached:
# ~0.1 ms, less than the hop to a worker thread.
INLINE_FRAME_BYTES = 128 << 10
# Level 1, not zstd's default 3: on the bench's pipeline corpus (214 MB of CSV and JSON in
# 64 KiB frames) it stores no more (0.34 of the text against 0.35) for 71% of the CPU, and an
# ingest's daemon CPU falls by ~11% (3.96 s against 4.45-4.54 s per cp -r of 300 MB, quiet).
DEFAULT_LEVEL = 1
# The level that compresses nothing: every blob is stored raw (with its block sums), and a write
# costs only its hashing (zstd's own level 0 means its default level, which is not useful here).
NO_COMPRESSION = 0
# Compress only when it saves at least this share of the bytes; otherwise store raw so that
# incompressible data (weights, archives) costs neither CPU at read time nor a seek table.
WORTHWHILE_RATIO = 0.90
# Below this, compression cannot save a disk block worth the seek table.
MIN_COMPRESS_SIZE = 512

_SKIPPABLE_MAGIC = 0x184D2A5E
_SEEKABLE_MAGIC = 0x8F92EAB1
_FOOTER = struct.Struct("<IBI")  # number of frames, descriptor, seekable magic
_ENTRY = struct.Struct("<III")  # compressed size, decompressed size, checksum
_CHECKSUM_FLAG = 0x80
# Bounds of compressing while writes arrive (FrameStream): streams at once (a zstd context of a
# few MB each), compressed bytes they hold in all and each.
MAX_STREAMS = 32
MAX_HELD_BYTES = 128 << 20
MAX_HELD_PER_STREAM = 16 << 20
# Zero frames kept compressed, one per distinct length (full hole frames share one; a shorter
# hole, or one at a blob's end, gives another length).
_ZERO_FRAMES_KEPT = 64

# Decompressed frames by (digest, frame index), bounded by bytes; shared by every reader.
FrameCache = Lru[tuple[str, int], bytes]
# A compressed frame: its bytes, its uncompressed size, its checksum.
Frame = tuple[bytes, int, int]


def new_frame_cache(max_bytes: int) -> FrameCache:
    # Threadsafe: seeding a copy-on-write temp may read frames in a worker thread.
    return Lru(max_bytes, size=len, threadsafe=True)


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # python-zstandard objects are not thread-safe: one per thread (and level).
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def _frame_checksum(data: bytes) -> int:
    return xxhash.xxh64_intdigest(data) & 0xFFFFFFFF


class FrameStream:
    """The zstd frames of a temp's content, built while the writes arrive (a FrameSink: fed in
    order by cafs.blobstore.stream). Each frame is compressed in one call when its last byte
    arrives — in the feed's worker thread, since the piece that completes a frame is heavy —
    so at publish only the last, partial frame is left to compress.

    It gives up (abandon) on anything it cannot follow — an out-of-order write, a truncate, a
    hole — and then publish compresses from the temp as before. What it holds is bounded: at
    most MAX_STREAMS exist at once (each holds up to a frame of plain bytes), and their finished
    frames take at most MAX_HELD_BYTES in all and MAX_HELD_PER_STREAM each, beyond which the
    stream gives up.
    """

    def __init__(self, writer: SeekableWriter) -> None:
        self._writer = writer
        self._lock = threading.Lock()  # the feeding thread vs. abandon from the owner
        self._pieces: list[bytes | memoryview] = []  # of the frame being filled
        self._filled = 0
        self.frames: list[Frame] = []
        self._held = 0
        self.dead = False
        self.raw_verdict = False  # the first frame compressed too little: store raw

    def completes_frame(self, size: int) -> bool:
        """Whether `size` more bytes end a frame (feeding them is heavy work)."""
        return not self.dead and self._filled + size >= self._writer.frame_size

    def update(self, data: bytes | memoryview) -> None:
        with self._lock:
            frame_size = self._writer.frame_size
            view = memoryview(data)
            while view and not self.dead:
                piece = view[:frame_size - self._filled]
                self._pieces.append(piece)
                self._filled += len(piece)
                view = view[len(piece):]
                if self._filled == frame_size:
                    self._end_frame()

    def _end_frame(self) -> None:
        plain = b"".join(self._pieces)
        self._pieces, self._filled = [], 0
        frame = _compressor(self._writer.level).compress(plain)
        if not self.frames and len(frame) > len(plain) * WORTHWHILE_RATIO:
            self.raw_verdict = True  # judged by the first frame, as compress_if_worthwhile does
            self._give_up()
        elif len(frame) + self._held > MAX_HELD_PER_STREAM or not self._writer.hold(len(frame)):
            self._give_up()
        else:
            self._held += len(frame)
            self.frames.append((frame, len(plain), _frame_checksum(plain)))

    def finish(self) -> list[Frame] | None:
        """Every frame of the content fed (the caller knows it was fed whole), or None."""
        with self._lock:
            if not self.dead and self._filled:
                self._end_frame()
            return None if self.dead else self.frames

    def abandon(self) -> None:
        with self._lock:
            self._give_up()

    def _give_up(self) -> None:
        if not self.dead:
            self._writer.stream_ended()  # its slot: counted from new_stream until here
        self.dead = True
        self._writer.unhold(self._held)
        self._held = 0
        self.frames, self._pieces = [], []


# -- writing ------------------------------------------------------------------------------


class SeekableWriter:
    """Compresses a finished temp into a new temp in the seekable format, when worthwhile."""

    def __init__(self, level: int = DEFAULT_LEVEL, frame_size: int = DEFAULT_FRAME_SIZE) -> None:
        self.level = level
        self.frame_size = frame_size
        self._threads = max(1, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._zero_frames: Lru[int, Frame] = Lru(_ZERO_FRAMES_KEPT, threadsafe=True)
        self._lock = threading.Lock()
        self.streams = 0  # FrameStreams alive
        self.held = 0  # bytes of finished frames they hold

    # -- the bounds of FrameStream ----------------------------------------------------------

    def new_stream(self) -> FrameStream | None:
        """A FrameStream for a new temp, or None if MAX_STREAMS are alive already."""
        if self.level == NO_COMPRESSION:
            return None
        with self._lock:
            if self.streams >= MAX_STREAMS:
                return None
            self.streams += 1
        return FrameStream(self)

    def stream_ended(self) -> None:
        with self._lock:
            self.streams -= 1

    def hold(self, size: int) -> bool:
        with self._lock:
            if self.held + size > MAX_HELD_BYTES:
                return False
            self.held += size
            return True

    def unhold(self, size: int) -> None:
        with self._lock:
            self.held -= size

    # -- compressing a finished temp --------------------------------------------------------

    def compress_if_worthwhile(self, temp: TempBlob,
                               new_temp: Callable[[], TempBlob]) -> TempBlob | None:
        """A temp (from `new_temp`) holding the compressed blob, or None if compressing saves
        too little: then the caller stores the content raw."""
        if temp.size < MIN_COMPRESS_SIZE or self.level == NO_COMPRESSION:
            return None
        stream = temp.frame_sink
        if isinstance(stream, FrameStream) and temp.fed_whole():
            frames = stream.finish()
            if stream.raw_verdict:
                return None
            if frames is not None:  # compressed while written: nothing left to compress
                return self._write_blob(temp, iter(frames), new_temp)
        # Judge by the first frame: incompressible data stops here and pays nothing more.
        spans = self._spans(temp)
        start, length, hole = next(spans)
        first = self._zero_frame(length) if hole else self._compress_frame(temp, start, length)
        if len(first[0]) > first[1] * WORTHWHILE_RATIO:
            return None
        with contextlib.closing(self._compressed_frames(temp, spans)) as rest:
            return self._write_blob(temp, itertools.chain([first], rest), new_temp)

    def _write_blob(self, temp: TempBlob, frames: Iterator[Frame],
                    new_temp: Callable[[], TempBlob]) -> TempBlob | None:
        """The frames and their seek table in a new temp, or None once they exceed the
        budget (compressing saves too little after all: store raw)."""
        budget = int(temp.size * WORTHWHILE_RATIO)
        entries: list[tuple[int, int, int]] = []
        out = new_temp()
        out_offset = 0
        try:
            for frame, plain_size, checksum in frames:
                pwrite_all(out.fd, frame, out_offset)
                out_offset += len(frame)
                entries.append((len(frame), plain_size, checksum))
                if out_offset > budget:  # compresses too little after all: store raw
                    out.discard()
                    return None
            table = b"".join(_ENTRY.pack(*entry) for entry in entries)
            footer = _FOOTER.pack(len(entries), _CHECKSUM_FLAG, _SEEKABLE_MAGIC)
            header = struct.pack("<II", _SKIPPABLE_MAGIC, len(table) + len(footer))
            pwrite_all(out.fd, header + table + footer, out_offset)
        except BaseException:
            out.discard()
            raise
        return out

    def _spans(self, temp: TempBlob) -> Iterator[tuple[int, int, bool]]:
        """(start, length, hole) of each frame of the temp, in order: `frame_size` bytes, or
        where a hole of at least that starts, the hole as one frame of up to HOLE_FRAME_SIZE
        that ends on the frame grid (or at the end), so the data after it is framed as usual."""
        step, size = self.frame_size, temp.size
        longest = max(HOLE_FRAME_SIZE, step)
        start = 0
        while start < size:
            length = min(step, size - start)
            hole = temp.hole_length(start, min(longest, size - start))
            if hole >= length:
                length = hole if start + hole == size else hole - hole % step
            yield start, length, hole >= length
            start += length

    def _compress_frame(self, temp: TempBlob, start: int, length: int) -> Frame:
        plain = temp.read(start, length)
        return _compressor(self.level).compress(plain), len(plain), _frame_checksum(plain)

    def _zero_frame(self, length: int) -> Frame:
        """A frame of `length` zeros (a hole): zeros compress to the same frame every time, so
        it is compressed once (per length) and reused."""
        frame = self._zero_frames.get(length)
        if frame is None:
            plain = bytes(length)
            frame = (_compressor(self.level).compress(plain), length, _frame_checksum(plain))
            self._zero_frames.put(length, frame)
        return frame

    def _compressed_frames(self, temp: TempBlob,
                           spans: Iterator[tuple[int, int, bool]]) -> Generator[Frame]:
        """The frames of `spans` (the rest of the temp), compressed, in order.

        In parallel on all cores (frames are independent and zstd releases the GIL), with a
        bounded number in flight so memory stays a few frames whatever the blob's size."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="cafs-zstd")
        in_flight: deque[Future[Frame]] = deque()
        try:
            for start, length, hole in spans:
                if hole:
                    done: Future[Frame] = Future()
                    done.set_result(self._zero_frame(length))
                    in_flight.append(done)
                else:
                    in_flight.append(
                        self._pool.submit(self._compress_frame, temp, start, length))
                if len(in_flight) >= 2 * self._threads:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()
            for future in in_flight:
                with contextlib.suppress(BaseException):
                    future.result()  # never close the temp under a running worker


# -- reading ------------------------------------------------------------------------------


class SeekTable:
    """The frames of a seekable zstd blob: where each starts, compressed and not."""

    def __init__(self, entries: list[tuple[int, int, int]]) -> None:
        self.compressed_offsets = [0]
        self.plain_offsets = [0]
        self.checksums = []
        for compressed_size, plain_size, checksum in entries:
            self.compressed_offsets.append(self.compressed_offsets[-1] + compressed_size)
            self.plain_offsets.append(self.plain_offsets[-1] + plain_size)
            self.checksums.append(checksum)

    @property
    def frame_count(self) -> int:
        return len(self.checksums)

    @property
    def plain_size(self) -> int:
        return self.plain_offsets[-1]

    def frame_at(self, plain_offset: int) -> int:
        return bisect.bisect_right(self.plain_offsets, plain_offset) - 1

    @classmethod
    def read_from(cls, fd: int, file_size: int) -> SeekTable:
        if file_size < _FOOTER.size:
            raise Corrupt("blob too short for a seek table")
        frames, descriptor, magic = _FOOTER.unpack(
            os.pread(fd, _FOOTER.size, file_size - _FOOTER.size)
        )
        if magic != _SEEKABLE_MAGIC or not descriptor & _CHECKSUM_FLAG:
            raise Corrupt("blob has no seek table")
        table_size = frames * _ENTRY.size
        start = file_size - _FOOTER.size - table_size
        if start < 8:
            raise Corrupt("seek table larger than the blob")
        raw = os.pread(fd, table_size, start)
        entries = [_ENTRY.unpack_from(raw, i * _ENTRY.size) for i in range(frames)]
        table = cls(entries)
        if table.compressed_offsets[-1] != start - 8:
            raise Corrupt("seek table does not match the frames")
        return table


class StreamCheck:
    """Checks a seekable zstd blob while its bytes arrive, in order (offset 0 starts over):
    each frame is decompressed as soon as it is whole, its plain bytes hashed (SHA-256 of the
    content) and its size and checksum noted; at the end the seek table must list exactly
    those frames. Frames of up to `keep` plain bytes in all are kept, for the frame cache
    once the blob proved right (frames()). Used where a download is checked (the S3 cache):
    the check overlaps the transfer instead of following it."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._decompressor = zstandard.ZstdDecompressor()  # its own: a decompressobj holds it
        self._start()

    def _start(self) -> None:
        self._sha256 = hashlib.sha256()
        self._entries: list[tuple[int, int, int]] = []
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        self._frame: Any = None  # the decompressor of the frame in progress
        self._frame_in = 0  # its compressed bytes so far
        self._frame_out: list[bytes] = []
        self._head = b""  # the first bytes of a frame, before its magic is known
        self._table = False  # the seek table's skippable frame began: the rest is it
        self._received = 0
        self._broken = False

    def __call__(self, offset: int, data: memoryview) -> None:
        if offset == 0:
            self._start()
        if self._broken:
            return
        if offset != self._received:
            self._broken = True
            return
        self._received += len(data)
        try:
            self._feed(bytes(data))
        except zstandard.ZstdError:
            self._broken = True  # the full check after the download says what is wrong

    def _feed(self, data: bytes) -> None:
        while data and not self._table:
            if self._frame is None:
                data = self._head + data
                if len(data) < 4:
                    self._head = data
                    return
                self._head = b""
                if struct.unpack_from("<I", data)[0] == _SKIPPABLE_MAGIC:
                    self._table = True
                    return
                self._frame = self._decompressor.decompressobj()
                self._frame_in = 0
                self._frame_out = []
            frame = self._frame
            self._frame_out.append(frame.decompress(data))
            if not frame.eof:
                self._frame_in += len(data)
                return
            rest = frame.unused_data
            self._frame_in += len(data) - len(rest)
            self._frame_done()
            data = rest

    def _frame_done(self) -> None:
        plain = b"".join(self._frame_out)
        self._frame, self._frame_out = None, []
        self._sha256.update(plain)
        self._entries.append((self._frame_in, len(plain), _frame_checksum(plain)))
        if self._kept_bytes + len(plain) <= self._keep:
            self._kept.append(plain)
            self._kept_bytes += len(plain)

    def proves(self, digest: Digest, fd: int, received: int) -> bool:
        """True if the `received` bytes (also in the file at `fd`) are the digest's blob,
        whole: frames and seek table."""
        if self._broken or not self._table or received != self._received:
            return False
        try:
            table = SeekTable.read_from(fd, received)
        except (Corrupt, OSError):
            return False
        listed = list(zip(
            [b - a for a, b in itertools.pairwise(table.compressed_offsets)],
            [b - a for a, b in itertools.pairwise(table.plain_offsets)],
            table.checksums, strict=True))
        return listed == self._entries and self._sha256.hexdigest() == digest

    def frames(self, digest: Digest) -> Iterator[tuple[tuple[str, int], bytes]]:
        """The frames kept, as the frame cache keys them (only once proves() said True)."""
        for index, plain in enumerate(self._kept):
            yield (digest, index), plain


class _Prefetcher:
    """Frames being decompressed ahead of sequential readers, by (digest, index)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.pending: dict[tuple[str, int], Future[bytes]] = {}

    def submit(self, key: tuple[str, int], work: Callable[[], bytes]) -> Future[bytes] | None:
        with self._lock:
            if key in self.pending:
                return None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(2, thread_name_prefix="cafs-unzstd")
            future = self._pool.submit(work)
            self.pending[key] = future
        future.add_done_callback(lambda _: self._done(key))
        return future

    def _done(self, key: tuple[str, int]) -> None:
        with self._lock:
            self.pending.pop(key, None)

    def wait(self, key: tuple[str, int]) -> None:
        """Wait for the frame if it is being decompressed ahead (its errors are the caller's
        to meet again: it reads the frame itself if the cache does not have it then)."""
        future = self.pending.get(key)  # (one dict lookup: atomic; no lock on the hot path)
        if future is not None:
            with contextlib.suppress(BaseException):
                future.result()


_prefetch = _Prefetcher()


class ZstdReader:
    """The reader, a BlobReader: decompresses (and checks) only the frames a read covers."""

    def __init__(self, fd: int, digest: Digest, cache: FrameCache, *,
                 read_ahead: bool = True) -> None:
        self._fd = SharedFd(fd)
        self._reads_ahead = read_ahead
        self._digest = digest
        self._cache = cache
        self.table = SeekTable.read_from(fd, os.fstat(fd).st_size)
        self.size = self.table.plain_size
        self._next = -1  # where the last read ended: a read starting there is sequential
        self._ahead: list[Future[bytes]] = []  # its frames being decompressed ahead
        # The frame of the last random read inside one frame, and where it starts, until taken.
        self._random_frame: tuple[int, bytes] | None = None

    def frame(self, index: int) -> bytes:
        key = (self._digest, index)
        data = self._cache.get(key)
        if data is None:
            if key in _prefetch.pending:  # being decompressed ahead: wait, not twice
                _prefetch.wait(key)
                data = self._cache.get(key)
            if data is None:
                data = self._load(index, key, os.pread)
        return data

    def _decompress(self, index: int) -> bytes:
        """Frame `index`, checked, into the cache unless it is there (read-ahead runs this;
        it never waits for other read-ahead)."""
        key = (self._digest, index)
        data = self._cache.get(key)
        return self._load(index, key, os.pread) if data is None else data

    def _load(self, index: int, key: tuple[str, int],
              pread: Callable[[int, int, int], bytes]) -> bytes:
        """Frame `index` from the file, checked, into the cache (the caller looked there).
        With pread_nowait: BlockingIOError if its compressed bytes are not in the page
        cache."""
        table = self.table
        start = table.compressed_offsets[index]
        with self._fd as fd:
            compressed = pread(fd, table.compressed_offsets[index + 1] - start, start)
        expected_size = table.plain_offsets[index + 1] - table.plain_offsets[index]
        try:
            # Frames compressed while written carry no content size in their header.
            data = _decompressor().decompress(compressed, max_output_size=expected_size)
        except zstandard.ZstdError as exc:
            raise Corrupt(f"blob {self._digest}: frame {index}: {exc}") from exc
        if len(data) != expected_size or _frame_checksum(data) != table.checksums[index]:
            raise Corrupt(f"blob {self._digest}: frame {index} fails its checksum")
        self._cache.put(key, data)
        return data

    def read(self, offset: int, length: int) -> bytes:
        one = self._inside_one_frame(offset, length)
        if one is not None:
            index, end = one
            return self._random_read(index, self.frame(index), offset, end)
        sequential = offset in (self._next, 0)  # from the start: most files are read whole
        data = self._read(offset, length, self.frame)
        assert data is not None
        self._next = offset + len(data)
        if sequential:
            self._read_ahead(self._next)
        return data

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """The bytes if every frame they need is decompressed already; None otherwise (the
        caller then reads in a worker thread)."""
        one = self._inside_one_frame(offset, length)
        if one is not None:
            index, end = one
            frame = self._cached_frame(index)
            return None if frame is None else self._random_read(index, frame, offset, end)
        sequential = offset in (self._next, 0)
        data = self._read(offset, length, self._cached_frame)
        if data is not None:
            self._next = offset + len(data)
            if sequential:
                self._read_ahead(self._next)
        return data

    def _inside_one_frame(self, offset: int, length: int) -> tuple[int, int] | None:
        """(frame index, end) of a read at random inside one frame (a small READ of a large
        file), which read() and read_nowait() serve in the fewest steps: the frame is found
        once, and nothing is read ahead. None for any other read."""
        if offset in (self._next, 0):  # sequential: from the start, most files are read whole
            return None
        plain_offsets = self.table.plain_offsets
        index = bisect.bisect_right(plain_offsets, offset) - 1
        end = min(offset + length, self.size)  # a READ of the last page asks past the end
        return (index, end) if offset < end <= plain_offsets[index + 1] else None

    def _random_read(self, index: int, frame: bytes, offset: int, end: int) -> bytes:
        """The bytes of a read inside frame `index`; the frame is kept for the page cache
        (take_random_frame)."""
        frame_start = self.table.plain_offsets[index]
        self._next = end
        self._random_frame = (frame_start, frame)
        return frame[offset - frame_start : end - frame_start]

    def take_random_frame(self) -> tuple[int, bytes] | None:
        """(where it starts, its bytes) of the frame the last random read inside one frame
        decompressed or found, once: the rest of it is worth the kernel's page cache
        (OpenFiles._fill_page_cache)."""
        found, self._random_frame = self._random_frame, None
        return found

    def _cached_frame(self, index: int) -> bytes | None:
        """The frame if it is decompressed already, or if it is small and its compressed
        bytes are in the page cache: decompressing up to INLINE_FRAME_BYTES costs less than
        the hop to a worker thread (a random 4 KiB read of a cold blob is one such frame)."""
        key = (self._digest, index)
        data = self._cache.get(key)
        if data is not None or self._reads_ahead is False:
            return data
        table = self.table
        if table.plain_offsets[index + 1] - table.plain_offsets[index] > INLINE_FRAME_BYTES:
            return None
        try:
            return self._load(index, key, pread_nowait)
        except BlockingIOError:
            return None

    def _read(self, offset: int, length: int,
              frame: Callable[[int], bytes | None]) -> bytes | None:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        table = self.table
        parts = []
        index = table.frame_at(offset)
        while offset < end:
            frame_start = table.plain_offsets[index]
            data = frame(index)
            if data is None:
                return None
            parts.append(data[offset - frame_start : end - frame_start])
            offset = frame_start + len(data)
            index += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_ahead(self, offset: int) -> None:
        """Decompress the frames of the next READ_AHEAD_BYTES in worker threads, into the
        shared cache. Each is checked as any frame is: a damaged one is simply not cached, and
        the read that needs it meets the damage itself."""
        table = self.table
        if offset >= self.size or not self._reads_ahead:
            return
        last = table.frame_at(min(self.size - 1, offset + READ_AHEAD_BYTES))
        self._ahead = [future for future in self._ahead if not future.done()]
        for index in range(table.frame_at(offset), last + 1):
            key = (self._digest, index)
            if key not in self._cache:
                future = _prefetch.submit(key, functools.partial(self._decompress, index))
                if future is not None:
                    self._ahead.append(future)

    def idle(self) -> None:
        """Read-ahead not started yet is cancelled."""
        for future in self._ahead:
            future.cancel()
        self._ahead = []
        self._next = -1

    def close(self) -> None:
        # Read-ahead not started yet is cancelled; one running keeps the descriptor open
        # until it is done (SharedFd).
        self.idle()
        self._fd.close()
