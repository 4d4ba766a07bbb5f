"""The "raw" encoding (legacy, read-only): the content bytes as they are, nothing else.

Format: the file is the content; its size is the content's size. No checksums, so damage shows
only when `cafs fsck --full` re-hashes the blob. Blobs stored before raw+xxh64 existed have it;
nothing writes it any more (cafs.blobstore.raw_xxh64 replaced it).

Owns: reading such a blob. Must not write one.
"""

from __future__ import annotations

import os


class RawReader:
    """A BlobReader over a raw blob: plain preads."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.size = os.fstat(fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)
