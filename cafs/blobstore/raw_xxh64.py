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

import os
import struct
from collections.abc import Callable

import xxhash

from cafs.blobstore.fileio import ZEROS, Sequential, SharedFd, pread_nowait
from cafs.digest import Digest
from cafs.errors import Corrupt

# A block is what one checksum covers. 64 KiB: FUSE reads (128 KiB, aligned) cover whole
# blocks, and the table costs 128 KiB per GiB.
CHECK_BLOCK_SIZE = 1 << 16
_BLOCK_SUM = struct.Struct("<Q")
_FOOTER = struct.Struct("<QII")  # content size, block size, magic
_MAGIC = 0xCAF5B10C
_ZERO_BLOCK_SUM = xxhash.xxh64_intdigest(bytes(CHECK_BLOCK_SIZE))


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

    def read(self, offset: int, length: int) -> bytes:
        self._sequential.seen(offset, length)
        return self._read(offset, length, os.pread)  # type: ignore[arg-type]

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """The bytes if the page cache holds them (and their sums) now; None if reading them
        would wait for the disk: then the caller reads in a worker thread."""
        try:
            data = self._read(offset, length, pread_nowait)
        except BlockingIOError:
            return None
        self._sequential.seen(offset, length)
        return data

    def _read(self, offset: int, length: int, pread: Callable[[int, int, int], bytes]) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // CHECK_BLOCK_SIZE, (end - 1) // CHECK_BLOCK_SIZE
        start = first * CHECK_BLOCK_SIZE
        stop = min((last + 1) * CHECK_BLOCK_SIZE, self.size)
        with self._fd as fd:
            data = pread(fd, stop - start, start)
            sums = pread(fd, (last - first + 1) * _BLOCK_SUM.size,
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
        self._fd.close()
