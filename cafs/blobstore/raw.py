"""The "raw" encoding (legacy, read-only): the content bytes as they are, nothing else.

Format: the file is the content; its size is the content's size. No checksums, so damage shows
only when `cafs fsck --full` re-hashes the blob. Blobs stored before raw+xxh64 existed have it;
nothing writes it any more (cafs.blobstore.raw_xxh64 replaced it).

Owns: reading such a blob. Must not write one.
"""

from __future__ import annotations

import os

from cafs.blobstore.fileio import Sequential, SharedFd, pread_nowait


class RawReader:
    """A BlobReader over a raw blob: plain preads."""

    def __init__(self, fd: int) -> None:
        self._fd = SharedFd(fd)
        self.size = os.fstat(fd).st_size
        self._sequential = Sequential(self._fd)

    def read(self, offset: int, length: int) -> bytes:
        self._sequential.seen(offset, length)
        with self._fd as fd:
            return os.pread(fd, length, offset)

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        try:
            with self._fd as fd:
                data = pread_nowait(fd, min(length, max(0, self.size - offset)), offset)
        except BlockingIOError:
            return None
        self._sequential.seen(offset, length)
        return data

    def idle(self) -> None:
        """Nothing held beyond the descriptor."""

    def close(self) -> None:
        self._fd.close()
