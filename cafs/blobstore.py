"""The blob store: immutable files named by the SHA-256 of their uncompressed bytes.

Owns: everything under `<store>/blobs/` and `<store>/tmp/` — temp files of writes in progress,
hashing while writing, the decision to compress, the durable publish (fsync, rename, fsync of the
shard directory) and reads at any offset. It is the only module that imports zstandard.
Must not know about paths in the namespace, the manifest, or FUSE.

Layout: `blobs/ab/<64 hex>`; 256 shard directories are made when the store is created.

Encodings:
- "raw+xxh64": the bytes as they are, then the XXH64 of every 64 KiB block (8 bytes each) and a
  16-byte footer (content size, block size, magic). A read checks the blocks it covers, so a
  flipped byte gives EIO, never wrong bytes. `head -c SIZE blob` yields the content.
- "raw": the bytes as they are, with no checksums (blobs stored before raw+xxh64 existed; still
  read, and checked by `cafs fsck --full`).
- "zstd": zstd's seekable format — independent zstd frames of at most `frame_size` uncompressed
  bytes, followed by a skippable frame holding the seek table (compressed size, decompressed size,
  and the low 32 bits of XXH64 of each frame's bytes). A read decompresses only the frames it
  covers and checks each frame's checksum, so a flipped byte gives EIO, never wrong bytes.
  The file is an ordinary .zst stream: `zstd -d < blob` yields the content.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import itertools
import os
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import xxhash
import zstandard

from cafs import crashpoints
from cafs.digest import Digest, is_digest
from cafs.errors import Corrupt, OutOfSpace
from cafs.model import StoredBlob

RAW = "raw"
RAW_CHECKED = "raw+xxh64"
ZSTD = "zstd"
ENCODINGS = (RAW, RAW_CHECKED, ZSTD)

DEFAULT_FRAME_SIZE = 1 << 20
DEFAULT_LEVEL = 3
# Compress only when it saves at least this share of the bytes; otherwise store raw so that
# incompressible data (weights, archives) costs neither CPU at read time nor a seek table.
WORTHWHILE_RATIO = 0.90
# Below this, compression cannot save a disk block worth the seek table.
MIN_COMPRESS_SIZE = 512

_COPY_CHUNK = 1 << 20
# Holes of a sparse temp (truncate -s 50G) are hashed from this instead of being read: the
# kernel would only copy zeros out, 50 GB of them.
_ZEROS = bytes(_COPY_CHUNK)
_SKIPPABLE_MAGIC = 0x184D2A5E
_SEEKABLE_MAGIC = 0x8F92EAB1
_FOOTER = struct.Struct("<IBI")  # number of frames, descriptor, seekable magic
_ENTRY = struct.Struct("<III")  # compressed size, decompressed size, checksum
_CHECKSUM_FLAG = 0x80
# raw+xxh64: a block is what one checksum covers. 64 KiB: FUSE reads (128 KiB, aligned) cover
# whole blocks, and the table costs 128 KiB per GiB.
CHECK_BLOCK_SIZE = 1 << 16
_BLOCK_SUM = struct.Struct("<Q")
_RAW_FOOTER = struct.Struct("<QII")  # content size, block size, magic
_RAW_MAGIC = 0xCAF5B10C


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


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpaceGuard:
    """Keeps a reserve free on the store's filesystem, so that the manifest can still commit
    (and a failed write can still be cleaned up) when writers have filled the disk.

    Writers get ENOSPC once writing would eat into the reserve; statfs (df) reports the space
    above the reserve as available. The reserve is 2% of the filesystem, at least 2 MiB and at
    most 256 MiB. Free space is re-read at most every REFRESH_SECONDS, or when it runs low.

    Manifest changes that grow the store (new names, tags, versions) may use the upper half of
    the reserve (`take_metadata`), never the lower half: that is kept for what frees space —
    deletes, gc, and the daemon's own start and stop — so they always commit.
    """

    REFRESH_SECONDS = 0.25
    MIN_RESERVE = 2 << 20
    MAX_RESERVE = 256 << 20

    def __init__(self, path: Path) -> None:
        self._path = path
        self.reserve = 0
        self._free = 0
        self._read_at = -1.0
        self._lock = threading.Lock()  # copy-on-write and imports write from worker threads

    def statvfs(self) -> os.statvfs_result:
        """The filesystem's statvfs, with the reserve taken out of the available blocks."""
        fs = os.statvfs(self._path)
        self._update(fs)
        reserve_blocks = -(-self.reserve // fs.f_frsize)
        fields = list(fs)
        fields[3] = max(0, fs.f_bfree - reserve_blocks)  # f_bfree
        fields[4] = max(0, fs.f_bavail - reserve_blocks)  # f_bavail
        return os.statvfs_result(fields)

    def take(self, size: int) -> None:
        """Account for `size` bytes about to be written; OutOfSpace if they do not fit."""
        self._take(size, 1)

    def take_metadata(self, size: int) -> None:
        """Account for a manifest change that grows the store by about `size` bytes;
        OutOfSpace once it would eat into the half of the reserve kept for deletes and gc."""
        self._take(size, 2)

    def low(self) -> bool:
        """True once writers have reached the reserve (free space re-read if stale)."""
        with self._lock:
            self._refresh(0)
            return self._free < self.reserve

    def _take(self, size: int, divisor: int) -> None:
        with self._lock:
            self._refresh(size)
            floor = self.reserve // divisor
            if self._free - size < floor:
                raise OutOfSpace(f"the store's filesystem is full (keeping {floor} bytes "
                                 "for the manifest)")
            self._free -= size

    def _refresh(self, size: int) -> None:
        # Inside the reserve every decision reads the real free space: what the manifest
        # writes is only estimated.
        now = time.monotonic()
        if now - self._read_at > self.REFRESH_SECONDS or self._free - size < self.reserve:
            self._update(os.statvfs(self._path))
            self._read_at = now

    def _update(self, fs: os.statvfs_result) -> None:
        self._free = fs.f_bavail * fs.f_frsize
        total = fs.f_blocks * fs.f_frsize
        self.reserve = min(self.MAX_RESERVE, max(self.MIN_RESERVE, total // 50))


class FrameCache:
    """A small LRU of decompressed frames, bounded by bytes. Shared by all readers."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._frames: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()  # seeding a copy-on-write temp may run in a worker thread

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            data = self._frames.get(key)
            if data is not None:
                self._frames.move_to_end(key)
            return data

    def put(self, key: tuple[str, int], data: bytes) -> None:
        if len(data) > self._max_bytes:
            return
        with self._lock:
            if key in self._frames:
                return
            self._frames[key] = data
            self._bytes += len(data)
            while self._bytes > self._max_bytes:
                _, evicted = self._frames.popitem(last=False)
                self._bytes -= len(evicted)


class BlobReader:
    """Random access to one blob's uncompressed bytes. Not shared between threads."""

    size: int

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class RawReader(BlobReader):
    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)


class CheckedRawReader(BlobReader):
    """A raw+xxh64 blob: reads fetch whole blocks and check each against its XXH64."""

    def __init__(self, fd: int, digest: Digest) -> None:
        self._fd = fd
        self._digest = digest
        file_size = os.fstat(fd).st_size
        if file_size < _RAW_FOOTER.size:
            raise Corrupt(f"blob {digest}: too short for its checksum footer")
        size, block_size, magic = _RAW_FOOTER.unpack(
            os.pread(fd, _RAW_FOOTER.size, file_size - _RAW_FOOTER.size))
        if magic != _RAW_MAGIC or block_size != CHECK_BLOCK_SIZE \
                or file_size != checked_raw_size(size):
            raise Corrupt(f"blob {digest}: checksum footer does not match the file")
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // CHECK_BLOCK_SIZE, (end - 1) // CHECK_BLOCK_SIZE
        start = first * CHECK_BLOCK_SIZE
        stop = min((last + 1) * CHECK_BLOCK_SIZE, self.size)
        data = os.pread(self._fd, stop - start, start)
        sums = os.pread(self._fd, (last - first + 1) * _BLOCK_SUM.size,
                        self.size + first * _BLOCK_SUM.size)
        if len(data) != stop - start or len(sums) != (last - first + 1) * _BLOCK_SUM.size:
            raise Corrupt(f"blob {self._digest}: shorter than its footer says")
        view = memoryview(data)
        for index, (expected,) in enumerate(_BLOCK_SUM.iter_unpack(sums)):
            block = view[index * CHECK_BLOCK_SIZE:(index + 1) * CHECK_BLOCK_SIZE]
            if xxhash.xxh64_intdigest(block) != expected:
                raise Corrupt(f"blob {self._digest}: block {first + index} fails its checksum")
        if offset == start and end == stop:
            return data
        return data[offset - start:end - start]

    def close(self) -> None:
        os.close(self._fd)


def checked_raw_size(size: int) -> int:
    """Bytes on disk of a raw+xxh64 blob of `size` content bytes."""
    blocks = -(-size // CHECK_BLOCK_SIZE)
    return size + blocks * _BLOCK_SUM.size + _RAW_FOOTER.size


_ZERO_BLOCK_SUM = xxhash.xxh64_intdigest(bytes(CHECK_BLOCK_SIZE))


class BlockSums:
    """XXH64 of each CHECK_BLOCK_SIZE block of bytes fed in order."""

    def __init__(self) -> None:
        self.sums: list[int] = []
        self._hasher = xxhash.xxh64()
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        if data is _ZEROS and self._filled == 0:
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
        return table + _RAW_FOOTER.pack(size, CHECK_BLOCK_SIZE, _RAW_MAGIC)


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


class ZstdReader(BlobReader):
    def __init__(self, fd: int, digest: Digest, cache: FrameCache) -> None:
        self._fd = fd
        self._digest = digest
        self._cache = cache
        self.table = SeekTable.read_from(fd, os.fstat(fd).st_size)
        self.size = self.table.plain_size

    def frame(self, index: int) -> bytes:
        key = (self._digest, index)
        data = self._cache.get(key)
        if data is None:
            table = self.table
            start = table.compressed_offsets[index]
            compressed = os.pread(self._fd, table.compressed_offsets[index + 1] - start, start)
            expected_size = table.plain_offsets[index + 1] - table.plain_offsets[index]
            try:
                data = _decompressor().decompress(compressed)
            except zstandard.ZstdError as exc:
                raise Corrupt(f"blob {self._digest}: frame {index}: {exc}") from exc
            if len(data) != expected_size or _frame_checksum(data) != table.checksums[index]:
                raise Corrupt(f"blob {self._digest}: frame {index} fails its checksum")
            self._cache.put(key, data)
        return data

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        table = self.table
        parts = []
        index = table.frame_at(offset)
        while offset < end:
            frame_start = table.plain_offsets[index]
            data = self.frame(index)
            parts.append(data[offset - frame_start : end - frame_start])
            offset = frame_start + len(data)
            index += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        os.close(self._fd)


class TempBlob:
    """A write in progress: a temp file in `tmp/`, hashed while writes arrive in order.

    SHA-256 is fed by writes that continue exactly where the hashed prefix ends. Any other write
    or truncate makes the prefix hash invalid; the digest is then computed from the file at the
    end. Not thread-safe: the owner serialises calls.
    """

    def __init__(self, fd: int, path: Path, space: SpaceGuard | None = None) -> None:
        self.fd = fd
        self.path = path
        self._space = space
        self.size = 0
        self._hasher = hashlib.sha256()
        self._block_sums = BlockSums()  # fed alongside _hasher
        self._hashed = 0  # bytes fed to _hasher; -1 once out-of-order writes invalidated it

    def write(self, offset: int, data: bytes) -> int:
        if self._space is not None:
            self._space.take(max(0, offset + len(data) - self.size))
        _pwrite_all(self.fd, data, offset)
        crashpoints.reached("after-temp-write")
        if self._hashed == offset:
            self._hasher.update(data)
            self._block_sums.update(data)
            self._hashed += len(data)
        elif data:
            self._hashed = -1
        self.size = max(self.size, offset + len(data))
        return len(data)

    def read(self, offset: int, length: int) -> bytes:
        # Never past the content: publishing appends a checksum trailer to the same file.
        return os.pread(self.fd, max(0, min(length, self.size - offset)), offset)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        if size == 0:
            self._hasher = hashlib.sha256()
            self._block_sums = BlockSums()
            self._hashed = 0
        elif size != self._hashed:
            self._hashed = -1
        self.size = size

    def fill_from(self, reader: BlobReader) -> None:
        """Make this (empty) temp a copy of a blob: the start of a copy-on-write. Runs of
        zeros stay holes (a copy of a 50 GB sparse file takes no disk)."""
        offset = 0
        while offset < reader.size:
            chunk = reader.read(offset, _COPY_CHUNK)
            if not chunk:
                raise Corrupt("blob shorter than recorded")
            if len(chunk) == len(_ZEROS) and chunk == _ZEROS:  # memcmp: fast
                self._extend_with_zeros(offset, _ZEROS)
            else:
                self.write(offset, chunk)
            offset += len(chunk)

    def _extend_with_zeros(self, offset: int, zeros: bytes) -> None:
        """As write(offset, zeros) at the end of the content, leaving a hole."""
        assert offset == self.size
        os.ftruncate(self.fd, offset + len(zeros))
        if self._hashed == offset:
            self._hasher.update(zeros)
            self._block_sums.update(zeros)
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
                length = min(_COPY_CHUNK - offset % _COPY_CHUNK, data_at - offset)
                chunk = _ZEROS if length == len(_ZEROS) else bytes(length)
            else:
                length = min(_COPY_CHUNK - offset % _COPY_CHUNK, end - offset)
                chunk = os.pread(self.fd, length, offset)
                if len(chunk) != length:
                    raise Corrupt("temp file shorter than written")
            yield chunk
            offset += length

    def _next_data(self, offset: int, end: int) -> int:
        """Where data starts at or after `offset` (`end` if only a hole is left)."""
        try:
            return min(end, os.lseek(self.fd, offset, os.SEEK_DATA))
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a hole up to the end of the file
                return end
            if exc.errno == errno.EINVAL:  # a filesystem without SEEK_DATA: read it all
                return offset
            raise

    def is_hole(self, start: int, length: int) -> bool:
        """True if [start, start+length) is surely zeros without data (a hole)."""
        return self._next_data(start, start + length) >= start + length

    def digest(self) -> Digest:
        """SHA-256 of the content; after out-of-order writes, read back (block sums too)."""
        if self._hashed != self.size:
            self._hasher = hashlib.sha256()
            self._block_sums = BlockSums()
            for chunk in self.chunks():
                self._hasher.update(chunk)
                self._block_sums.update(chunk)
            self._hashed = self.size
        return Digest(self._hasher.hexdigest())

    def append_block_sums(self) -> None:
        """Write the raw+xxh64 trailer after the content."""
        self.digest()  # makes the block sums whole, reading the file back if need be
        _pwrite_all(self.fd, self._block_sums.trailer(self.size), self.size)

    @property
    def needs_rehash(self) -> bool:
        return self._hashed != self.size

    def discard(self) -> None:
        """Close and remove the temp; safe to call twice, and after a failed descriptor."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):  # the file goes anyway; a bad fd must not leak it
                os.close(fd)
        # Never raises: it runs after a publish has committed. A temp that cannot be removed
        # now is removed at the next start.
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class BlobStore:
    """Immutable blobs by digest, plus the temp files that become them."""

    def __init__(
        self,
        root: Path,
        *,
        level: int = DEFAULT_LEVEL,
        frame_size: int = DEFAULT_FRAME_SIZE,
        frame_cache_bytes: int = 64 << 20,
    ) -> None:
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.level = level
        self.frame_size = frame_size
        self.frame_cache = FrameCache(frame_cache_bytes)
        self.space = SpaceGuard(root)
        self._temp_serial = 0
        self._threads = max(1, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._zero_frames: dict[tuple[int, int], tuple[bytes, int, int]] = {}

    # -- set-up ---------------------------------------------------------------------------

    def create_layout(self) -> None:
        for directory in (self.blob_dir, self.tmp_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
        for shard in range(256):
            (self.blob_dir / f"{shard:02x}").mkdir(mode=0o700, exist_ok=True)

    def clean_tmp(self) -> int:
        """Remove every temp file: writes that were in progress when the daemon stopped."""
        removed = 0
        # tmp/ itself is opened without following a symlink (cafs.store refuses a store where
        # it is one; this holds even if the check was skipped), and emptied through that
        # descriptor: start-up must never empty a directory a symlink points at.
        fd = os.open(self.tmp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    # Never follow a planted symlink; remove the link itself.
                    if entry.is_dir(follow_symlinks=False):
                        continue
                    os.unlink(entry.name, dir_fd=fd)
                    removed += 1
        finally:
            os.close(fd)
        return removed

    # -- writing --------------------------------------------------------------------------

    def new_temp(self) -> TempBlob:
        self._temp_serial += 1
        name = f"w-{os.getpid()}-{self._temp_serial}-{os.urandom(4).hex()}"
        path = self.tmp_dir / name
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return TempBlob(os.open(path, flags, 0o600), path, self.space)

    def path_of(self, digest: Digest) -> Path:
        return self.blob_dir / digest[:2] / digest

    def has(self, digest: Digest) -> bool:
        return os.path.lexists(self.path_of(digest))

    def publish(self, temp: TempBlob, digest: Digest) -> StoredBlob:
        """Turn a finished temp into the blob `digest`, durably.

        Compresses when worthwhile, fsyncs, renames into place and fsyncs the shard directory,
        so that a manifest row written afterwards never points at a partial blob. The temp's
        file descriptor stays open (readers may still use it); the caller discards the temp.
        """
        final = self.path_of(digest)
        chosen = temp
        compressed = self._compress_if_worthwhile(temp)
        if compressed is not None:
            chosen, encoding = compressed, ZSTD
        else:
            temp.append_block_sums()
            encoding = RAW_CHECKED
        try:
            os.fsync(chosen.fd)
            crashpoints.reached("after-temp-fsync")
            stored_size = os.fstat(chosen.fd).st_size
            os.rename(chosen.path, final)
            _fsync_dir(final.parent)
            crashpoints.reached("after-blob-rename")
        finally:
            if compressed is not None:
                compressed.discard()
        return StoredBlob(digest, temp.size, stored_size, encoding)

    def _compress_frame(self, temp: TempBlob, start: int) -> tuple[bytes, int, int]:
        plain = temp.read(start, self.frame_size)
        return _compressor(self.level).compress(plain), len(plain), _frame_checksum(plain)

    def _zero_frame(self, temp: TempBlob, start: int) -> tuple[bytes, int, int] | None:
        """The frame at `start` if it lies in a hole: zeros compress to the same frame every
        time, so it is compressed once (per size) and reused."""
        length = min(self.frame_size, temp.size - start)
        if not temp.is_hole(start, length):
            return None
        key = (self.level, length)
        frame = self._zero_frames.get(key)
        if frame is None:
            plain = bytes(length)
            frame = (_compressor(self.level).compress(plain), length, _frame_checksum(plain))
            self._zero_frames[key] = frame
        return frame

    def _compressed_frames(self, temp: TempBlob) -> Generator[tuple[bytes, int, int]]:
        """Every frame of the temp after the first, compressed, in order.

        In parallel on all cores (frames are independent and zstd releases the GIL), with a
        bounded number in flight so memory stays a few frames whatever the blob's size."""
        starts = range(self.frame_size, temp.size, self.frame_size)  # the first is done already
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="cafs-zstd")
        in_flight: deque[Future[tuple[bytes, int, int]]] = deque()
        try:
            for start in starts:
                zeros = self._zero_frame(temp, start)
                if zeros is not None:
                    done: Future[tuple[bytes, int, int]] = Future()
                    done.set_result(zeros)
                    in_flight.append(done)
                else:
                    in_flight.append(self._pool.submit(self._compress_frame, temp, start))
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

    def _compress_if_worthwhile(self, temp: TempBlob) -> TempBlob | None:
        if temp.size < MIN_COMPRESS_SIZE:
            return None
        # Judge by the first frame: incompressible data stops here and pays nothing more.
        first = self._zero_frame(temp, 0) or self._compress_frame(temp, 0)
        if len(first[0]) > first[1] * WORTHWHILE_RATIO:
            return None
        budget = int(temp.size * WORTHWHILE_RATIO)
        entries: list[tuple[int, int, int]] = []
        out = self.new_temp()
        out_offset = 0
        try:
            with contextlib.closing(self._compressed_frames(temp)) as rest:
                for frame, plain_size, checksum in itertools.chain([first], rest):
                    _pwrite_all(out.fd, frame, out_offset)
                    out_offset += len(frame)
                    entries.append((len(frame), plain_size, checksum))
                    if out_offset > budget:  # compresses too little after all: store raw
                        out.discard()
                        return None
            table = b"".join(_ENTRY.pack(*entry) for entry in entries)
            footer = _FOOTER.pack(len(entries), _CHECKSUM_FLAG, _SEEKABLE_MAGIC)
            header = struct.pack("<II", _SKIPPABLE_MAGIC, len(table) + len(footer))
            _pwrite_all(out.fd, header + table + footer, out_offset)
        except BaseException:
            out.discard()
            raise
        return out

    # -- reading --------------------------------------------------------------------------

    def open(self, digest: Digest, encoding: str) -> BlobReader:
        try:
            fd = os.open(self.path_of(digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise Corrupt(f"blob {digest} is missing") from exc
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise  # the daemon is short of resources; the blob is fine
            raise Corrupt(f"blob {digest}: {exc.strerror}") from exc
        try:
            if encoding == RAW_CHECKED:
                return CheckedRawReader(fd, digest)
            if encoding == RAW:
                return RawReader(fd, os.fstat(fd).st_size)
            if encoding == ZSTD:
                return ZstdReader(fd, digest, self.frame_cache)
            raise Corrupt(f"blob {digest}: unknown encoding {encoding!r}")
        except BaseException:
            os.close(fd)
            raise

    # -- administration -------------------------------------------------------------------

    def has_blob_files(self) -> bool:
        """True if any blob file exists (stops at the first one found)."""
        try:
            shards = sorted(os.listdir(self.blob_dir))
        except FileNotFoundError:
            return False
        for shard in shards:
            try:
                with os.scandir(self.blob_dir / shard) as entries:
                    if any(is_digest(entry.name) for entry in entries):
                        return True
            except NotADirectoryError:
                continue
        return False

    def iter_digests(self) -> Iterator[Digest]:
        """Every blob file's digest, shard by shard. Files not named like a digest are skipped."""
        for shard in sorted(os.listdir(self.blob_dir)):
            shard_dir = self.blob_dir / shard
            if not shard_dir.is_dir():
                continue
            for name in os.listdir(shard_dir):
                if is_digest(name) and name.startswith(shard):
                    yield Digest(name)

    def stored_size(self, digest: Digest) -> int:
        return os.lstat(self.path_of(digest)).st_size

    def compute_digest(self, digest: Digest, encoding: str) -> tuple[Digest, int]:
        """Re-hash a blob's uncompressed bytes (checks frame checksums on the way)."""
        reader = self.open(digest, encoding)
        try:
            hasher = hashlib.sha256()
            offset = 0
            while offset < reader.size:
                chunk = reader.read(offset, _COPY_CHUNK)
                if not chunk:
                    break
                hasher.update(chunk)
                offset += len(chunk)
            return Digest(hasher.hexdigest()), offset
        finally:
            reader.close()

    def delete(self, digest: Digest) -> None:
        os.unlink(self.path_of(digest))
