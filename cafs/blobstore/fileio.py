"""Small file helpers the blob store's modules share: whole writes, directory fsync, and the
constant buffer of zeros that stands for a hole.

Owns: nothing with state. Must not know about encodings, digests or the layout.
"""

from __future__ import annotations

import os
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
