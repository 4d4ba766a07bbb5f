"""Space accounting on the store's filesystem: the reserve that keeps the manifest writable.

Owns: the reserve's size, the running estimate of free space and the ENOSPC decision for
writers and for manifest growth. Must not write, delete or know about blobs or the manifest.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cafs.errors import OutOfSpace


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
        # Set by the store: whether the manifest's free pages hold a change of that many bytes
        # (then it needs no room on the filesystem). Only take_metadata asks it, on the thread
        # that owns the manifest's connection (the event loop's).
        self.manifest_room: Callable[[int], bool] | None = None

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
        OutOfSpace once it would eat into the half of the reserve kept for deletes and gc.
        A change that fits into free pages of the manifest (deletes and gc leave them) takes
        no room on the filesystem. While free space is well above the reserve the manifest is
        not asked (a query per create and per publish, for a question only a full disk needs)."""
        with self._lock:
            self._refresh(size)
            if self._free - size >= self.reserve:
                self._free -= size
                return
        if self.manifest_room is not None and self.manifest_room(size):
            return
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
