"""A store directory as a whole: where it is, its layout, its lock, and opening its parts.

Owns: `<store>/lock` (one daemon per store), the store directory's permissions, the rule that the
store and the mountpoint never contain each other, and start-up recovery. Must not know FUSE.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cafs.blobstore import BlobStore
from cafs.errors import CafsError, StoreBusy, StoreError
from cafs.manifest import Manifest
from cafs.model import BlobRef

MANIFEST_NAME = "manifest.sqlite"
LOCK_NAME = "lock"
LOG_NAME = "daemon.log"
# Present while a daemon serves the store; found at start-up, it means the last one never
# stopped cleanly (killed, crashed, power lost).
DIRTY_NAME = "dirty"
# After an unclean stop, the blobs written last are the ones a crash could have hurt.
RECENT_BLOBS_CHECKED = 200


def default_store_path() -> Path:
    """$CAFS_STORE, else $XDG_DATA_HOME/cafs, else ~/.local/share/cafs."""
    if os.environ.get("CAFS_STORE"):
        return Path(os.environ["CAFS_STORE"])
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "cafs"


def check_placement(store: Path, mountpoint: Path) -> None:
    """Refuse a store inside the mountpoint (every blob write would re-enter the daemon and
    deadlock) or a mountpoint inside the store."""
    store_real = store.resolve()
    mount_real = mountpoint.resolve()
    if store_real == mount_real or mount_real in store_real.parents:
        raise StoreError(f"store {store} lies inside the mountpoint {mountpoint}")
    if store_real in mount_real.parents:
        raise StoreError(f"mountpoint {mountpoint} lies inside the store {store}")


def prepare_store_dir(root: Path, *, create: bool) -> None:
    """Make the store directory if asked and missing, then check it is safe to use."""
    try:
        missing = not root.exists()
    except OSError as exc:  # a parent this user may not enter
        raise StoreError(f"store {root} is not reachable: {exc.strerror}") from exc
    if missing:
        if not create:
            raise StoreError(f"no store at {root}")
        try:
            root.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise StoreError(f"cannot create store {root}: {exc.strerror}") from exc
    _check_store_dir(root)


def _check_store_dir(root: Path) -> None:
    try:
        info = os.stat(root)
    except PermissionError as exc:
        raise StoreError(f"store {root} is not readable: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"store {root} is not a directory")
    if info.st_mode & stat.S_IWOTH:
        raise StoreError(f"store {root} is world-writable; refusing to use it (chmod 700 it)")
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise StoreError(f"store {root} is not readable and writable by this user")


@dataclass
class Recovery:
    temp_files: int
    unpublished: int


class Store:
    """An opened store. `lock=True` (the daemon) holds the store's lock until close()."""

    def __init__(self, root: Path, manifest: Manifest, blobs: BlobStore, lock_fd: int | None):
        self.root = root
        self.manifest = manifest
        self.blobs = blobs
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, root: Path, *, create: bool = True, lock: bool = False,
             compression_level: int = 3, owner: str = "") -> Store:
        root = root.absolute()
        prepare_store_dir(root, create=create)
        lock_fd = acquire_lock(root, owner) if lock else None
        try:
            blobs = BlobStore(root, level=compression_level)
            if create:
                blobs.create_layout()
            elif not (root / MANIFEST_NAME).exists():
                raise StoreError(f"no store at {root} (no {MANIFEST_NAME})")
            manifest = Manifest(root / MANIFEST_NAME, readonly=not create)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return cls(root, manifest, blobs, lock_fd)

    def recover(self) -> Recovery:
        """Start-up clean-up after any stop: no full scan, only what a crash can leave.

        Temp files are writes whose close() never returned; unpublished file rows are files whose
        first write never completed. Orphan blobs (renamed in, manifest not yet committed) are
        harmless garbage that `cafs fsck` reports.
        """
        return Recovery(self.blobs.clean_tmp(), self.manifest.remove_unpublished())

    def mark_dirty(self) -> bool:
        """Record that a daemon serves the store; True if the last one stopped uncleanly."""
        path = self.root / DIRTY_NAME
        unclean = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, f"pid {os.getpid()}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return unclean

    def mark_clean(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / DIRTY_NAME)

    def check_recent(self) -> list[str]:
        """Quick check after an unclean stop: the newest blobs exist with their recorded size.
        Bounded work, whatever the store's size; `cafs fsck` does the full check."""
        newest = self.manifest.newest_blobs(RECENT_BLOBS_CHECKED)
        return [problem for blob in newest if (problem := self.blob_file_problem(blob))]

    def blob_file_problem(self, blob: BlobRef) -> str | None:
        """What is wrong with a blob's file against its manifest row (missing, wrong size)."""
        try:
            size = self.blobs.stored_size(blob.digest)
        except FileNotFoundError:
            return f"blob {blob.digest}: missing"
        if size != blob.stored_size:
            return f"blob {blob.digest}: {size} bytes on disk, manifest says {blob.stored_size}"
        return None

    def content_problem(self, blob: BlobRef) -> str | None:
        """What is wrong with a blob's bytes: re-hashes them (frame checksums on the way)."""
        try:
            digest, size = self.blobs.compute_digest(blob.digest, blob.encoding)
        except CafsError as exc:
            return f"blob {blob.digest}: unreadable: {exc}"
        except OSError as exc:
            return f"blob {blob.digest}: unreadable: {exc.strerror}"
        if digest != blob.digest or size != blob.size:
            return f"blob {blob.digest}: content hashes to {digest}"
        return None

    def close(self) -> None:
        self.manifest.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def acquire_lock(root: Path, owner: str) -> int:
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StoreBusy(f"store {root} is in use ({holder or 'by another process'})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} {owner}".strip().encode() + b"\n", 0)
    return fd


def lock_holder(root: Path) -> int | None:
    """The pid of the daemon holding the store, or None if nobody holds it."""
    if not is_locked(root):
        return None
    words = lock_holder_text(root).split()
    return int(words[1]) if words[:1] == ["pid"] and words[1:2] and words[1].isdigit() else None


def lock_holder_text(root: Path) -> str:
    """What the lock file says of its holder ("pid N mounted at M", "pid N running cafs gc")."""
    try:
        return (root / LOCK_NAME).read_text().strip() or "by another process"
    except OSError:
        return "by another process"


def is_locked(root: Path) -> bool:
    """True while a daemon holds the store (it is mounted)."""
    try:
        fd = os.open(root / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
