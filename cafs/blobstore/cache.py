"""The local cache of a remote blob store: whole blob files, by digest, bounded by size.

Owns: the cache directory (`<digest>` files and `fetch-*` temps), which blobs it holds and how
many bytes, the least-recently-used order, and the pins of open readers. A file enters only by
`admit` (a rename of a temp the caller has checked against the content's SHA-256, or a link of
a blob just published), so a file under a digest's name was whole and right when it came in;
readers still check every block or frame, and a file found damaged is dropped (`drop`) and
fetched again by the caller. Must not talk to the object store or decode blobs (cafs.blobstore.s3
does both).

Thread-safe: the daemon's worker threads fetch and read while its event loop opens readers.
Nothing here grows with the store: only with what the cache holds (at most `capacity` bytes
of files, a few entries per MiB).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from cafs.digest import Digest, is_digest
from cafs.errors import StoreError

FETCH_PREFIX = "fetch-"
# Idle readers (of closed files, kept open for the next open) pin at most this share of the
# capacity: the rest stays for the files being read.
IDLE_SHARE = 4


class BlobCache:
    """At most `capacity` bytes of blob files in `directory`, least recently used evicted
    first, never one an open reader pins. A blob larger than the whole cache is admitted while
    a reader pins it and goes when the last one closes."""

    def __init__(self, directory: Path, capacity: int) -> None:
        self.directory = directory
        self.capacity = capacity
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # digest -> bytes; LRU first
        self._pins: Counter[str] = Counter()
        self._bytes = 0
        self._idle_bytes = 0  # of files idle readers keep pinned (hold_idle)
        self._serial = 0

    def load(self) -> None:
        """Make the directory (0700) and learn what it holds: temps of fetches a stopped process
        left are removed (not those of a live one); files are ordered by when they came in
        (mtime)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(self.directory)
        # Files the daemon trusts as checked land here: nobody else may plant or swap them.
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() \
                or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise StoreError(f"cache directory {self.directory} must be a directory (not a "
                             "symlink) of this user that no one else may write")
        found: list[tuple[int, str, int]] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(FETCH_PREFIX):
                    if not _fetcher_alive(entry.name):  # one cache_dir may serve several stores
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                elif is_digest(entry.name) and entry.is_file(follow_symlinks=False):
                    info = entry.stat(follow_symlinks=False)
                    found.append((info.st_mtime_ns, entry.name, info.st_size))
        with self._lock:
            self._sizes.clear()
            self._bytes = 0
            for _, name, size in sorted(found):
                self._sizes[name] = size
                self._bytes += size
            self._evict()

    # -- what it holds --------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        return self.directory / digest

    def holds(self, digest: str) -> bool:
        with self._lock:
            return digest in self._sizes

    @property
    def bytes(self) -> int:
        return self._bytes

    def open_fd(self, digest: str) -> int | None:
        """A descriptor of the cached file (now the most recently used), or None."""
        with self._lock:
            if digest not in self._sizes:
                return None
            try:
                fd = os.open(self.path(digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:  # removed behind our back: forget it
                self._bytes -= self._sizes.pop(digest)
                return None
            self._sizes.move_to_end(digest)
        return fd

    # -- filling and emptying ------------------------------------------------------------

    def temp_path(self) -> Path:
        """A fresh name for a fetch in progress, in the cache directory (same filesystem, so
        admit is a rename)."""
        with self._lock:
            self._serial += 1
            serial = self._serial
        return self.directory / f"{FETCH_PREFIX}{os.getpid()}-{serial}-{os.urandom(4).hex()}"

    def admit(self, digest: Digest, temp: Path) -> None:
        """Rename a checked temp into place as the digest's file (replacing a damaged one)."""
        size = os.stat(temp).st_size
        with self._lock:
            os.rename(temp, self.path(digest))
            self._bytes += size - self._sizes.pop(digest, 0)
            self._sizes[digest] = size
            self._evict()

    def admit_copy(self, digest: Digest, source: Path, source_fd: int) -> None:
        """Take in a blob just published from its temp: a hard link when the temp is on the
        same filesystem (no bytes copied), else a copy. Best effort: a failure only means the
        next read downloads it."""
        if self.holds(digest):
            return
        temp = self.temp_path()
        try:
            try:
                os.link(source, temp, follow_symlinks=False)
            except OSError:
                _copy_fd(source_fd, temp)
            self.admit(digest, temp)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temp)

    def drop(self, digest: str) -> None:
        """Remove the digest's file (damaged, or the blob was deleted). Readers that have it
        open keep their descriptor and keep checking what they read."""
        with self._lock:
            size = self._sizes.pop(digest, None)
            if size is not None:
                self._bytes -= size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(digest))

    def pin(self, digest: str) -> None:
        with self._lock:
            self._pins[digest] += 1

    def unpin(self, digest: str) -> None:
        with self._lock:
            self._pins[digest] -= 1
            if self._pins[digest] <= 0:
                del self._pins[digest]
            self._evict()

    def hold_idle(self, digest: str) -> int | None:
        """An idle reader asks to keep its pin on the digest's file: the file's bytes if that
        keeps what idle readers pin within capacity // IDLE_SHARE (give them back with
        end_idle), else None (it unpins and closes the file)."""
        with self._lock:
            size = self._sizes.get(digest)
            if size is None or self._idle_bytes + size > self.capacity // IDLE_SHARE:
                return None
            self._idle_bytes += size
            return size

    def end_idle(self, held: int) -> None:
        """An idle reader that held `held` bytes (hold_idle) is in use again, or closed."""
        with self._lock:
            self._idle_bytes -= held

    def _evict(self) -> None:
        """Under the lock: least recently used first, skipping pinned files, until the bytes
        fit the capacity (or only pinned files are left)."""
        if self._bytes <= self.capacity:
            return
        for digest in list(self._sizes):
            if self._bytes <= self.capacity:
                return
            if self._pins[digest] > 0:
                continue
            self._bytes -= self._sizes.pop(digest)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(digest))


def _fetcher_alive(name: str) -> bool:
    """Whether the process that named this temp (fetch-<pid>-...) still runs: another store's
    daemon (one configuration file names one cache_dir for all) may be downloading into it."""
    pid = name[len(FETCH_PREFIX):].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid() or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _copy_fd(source_fd: int, target: Path) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        size = os.fstat(source_fd).st_size
        offset = 0
        while offset < size:
            sent = os.copy_file_range(source_fd, fd, size - offset, offset, offset)
            if sent == 0:
                raise OSError("blob file shrank while copied into the cache")
            offset += sent
    finally:
        os.close(fd)
