"""A store directory as a whole: where it is, its layout, its lock, and opening its parts.

Owns: every name in the store's layout (the constants below: other modules use them, never a
literal), `<store>/lock` (one daemon per store) and the one answer to "who holds this store, and
does a daemon serve it" (`store_holder`, `serving_daemon`: the lock file's text is written and
parsed only here), the store directory's permissions and the rules that keep other users out of
it (see `check_store_dir`), the rule that the store and the mountpoint never contain each other,
and start-up recovery. Must not know FUSE, trio or the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cafs.blobstore import DEFAULT_LEVEL, Blobs, BlobsSpec, open_blob_store
from cafs.errors import CafsError, NeedsRepair, StoreBusy, StoreError
from cafs.manifest import Manifest, copy_manifest
from cafs.model import BlobRef
from cafs.options import check_manifest_location
from cafs.wal import check_wal, wal_path

MANIFEST_NAME = "manifest.sqlite"
# Where the manifest is when it is not manifest.sqlite: the PostgreSQL URL (never a password) the
# store was first mounted with, so every later opener finds the same manifest (and one given
# another by mistake is refused, never started fresh).
MANIFEST_URL_NAME = "manifest.url"
# A store's id, for a manifest.sqlite store (a manifest on PostgreSQL keeps its own): shared
# blob storage records the one store it belongs to (Blobs.claim).
STORE_ID_NAME = "store-id"
LOCK_NAME = "lock"
LOG_NAME = "daemon.log"
# The blob store's directories. cafs.blobstore sits below this module and makes them under the
# same names (it cannot import them from here).
BLOBS_DIR = "blobs"
TMP_DIR = "tmp"
# Blob files whose bytes fsck --repair found wrong, kept for forensics (cafs.maintenance).
QUARANTINE_DIR = "quarantine"
WHERE_NAME = "blobs-location"
LOCAL_WHERE = "blobs/"
# The daemon's control socket (cafs.control).
SOCKET_NAME = "control.sock"
# Present while a daemon serves the store; found at start-up, it means the last one never
# stopped cleanly (killed, crashed, power lost). A daemon writes "pid N" (or nothing, on a full
# disk): it had the manifest open in WAL mode, so the WAL must still be there. A read-write
# Store holding the lock rewrites it to WAL_CLOSED when it closes the manifest cleanly, which
# folds the WAL into the manifest and deletes it (see Store.close).
DIRTY_NAME = "dirty"
WAL_CLOSED = b"wal closed"
# Rotating copies of the manifest (SQLite online backup): backups/manifest-<UTC time>.sqlite.
BACKUP_DIR = "backups"
BACKUPS_KEPT = 5
# After an unclean stop, the blobs written last are the ones a crash could have hurt.
RECENT_BLOBS_CHECKED = 200

# Every entry cafs keeps directly in a store, with the only file type it may have. Root (or any
# user) mounting a store must never follow a symlink or write into a file another user planted
# there (tmp -> a directory start-up would empty, daemon.log -> a file the log would append to).
LAYOUT = {
    MANIFEST_NAME: stat.S_IFREG,
    MANIFEST_NAME + "-wal": stat.S_IFREG,  # SQLite's WAL and its shared-memory index
    MANIFEST_NAME + "-shm": stat.S_IFREG,
    MANIFEST_URL_NAME: stat.S_IFREG,
    STORE_ID_NAME: stat.S_IFREG,
    LOCK_NAME: stat.S_IFREG,
    LOG_NAME: stat.S_IFREG,
    DIRTY_NAME: stat.S_IFREG,
    SOCKET_NAME: stat.S_IFSOCK,  # cafs.control
    BLOBS_DIR: stat.S_IFDIR,  # cafs.blobstore; its 256 shard directories are checked too
    TMP_DIR: stat.S_IFDIR,
    QUARANTINE_DIR: stat.S_IFDIR,  # cafs.maintenance: damaged blobs kept for forensics
    BACKUP_DIR: stat.S_IFDIR,  # manifest backups
    "cache": stat.S_IFDIR,  # cafs.blobstore.cache: the default cache of blobs stored on S3
    WHERE_NAME: stat.S_IFREG,  # where the blobs live, if not blobs/ (see check_blobs_where)
}
_TYPE_NAMES = {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory",
               stat.S_IFSOCK: "socket"}


def default_store_path() -> Path:
    """$CAFS_STORE, else $XDG_DATA_HOME/cafs, else ~/.local/share/cafs."""
    if os.environ.get("CAFS_STORE"):
        return Path(os.environ["CAFS_STORE"])
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "cafs"


def real_store_path(root: Path) -> Path:
    """The store's real path, resolved once where the store path is decided; everything after
    (checks, the daemon, admin commands) uses only this path. A symlink on the given path may
    sit in a directory another user can write: followed again at each later open, it could be
    swapped for their store after the checks passed. A store path that is itself a symlink is
    followed only if this user or root made it."""
    root = root.absolute()
    try:
        link = os.lstat(root)
    except OSError:  # missing or unreachable: prepare_store_dir says which
        return root.resolve()
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (0, os.geteuid()):
        raise StoreError(f"store {root} is a symlink made by uid {link.st_uid}; refusing "
                         "to follow it")
    return root.resolve()


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
        os.lstat(root)
        missing = False
    except FileNotFoundError:
        missing = True
    except OSError as exc:  # a parent this user may not enter
        raise StoreError(f"store {root} is not reachable: {exc.strerror}") from exc
    if missing:
        if not create:
            raise StoreError(f"no store at {root}")
        try:
            root.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise StoreError(f"cannot create store {root}: {exc.strerror}") from exc
    check_store_dir(root)


def check_store_dir(root: Path) -> None:
    """Refuse a store another user could read, change or swap, or in which another user could
    have planted something (StoreError, with what to do about it).

    The store holds every user's bytes and the daemon (often root) creates, truncates, appends
    to and deletes files in it: it must be a directory owned by the user running cafs, that
    nobody else may enter (0700); every entry of its layout must be what cafs made (no
    symlink, no other owner, no other type, no extra hard link); and no other user may rename
    it or a directory above it away and put their own in its place while the daemon runs.
    There is no override: a store owned by another user is mounted as that user.
    """
    me = os.geteuid()
    try:
        link = os.lstat(root)
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in (0, me):
            raise StoreError(f"store {root} is a symlink made by uid {link.st_uid}; refusing "
                             "to follow it")
        info = os.stat(root)
    except PermissionError as exc:
        raise StoreError(f"store {root} is not readable: {exc.strerror}") from exc
    except FileNotFoundError:
        raise StoreError(f"no store at {root}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"store {root} is not a directory")
    if info.st_uid != me:
        raise StoreError(f"store {root} is owned by uid {info.st_uid}, not by this user "
                         f"(uid {me}); refusing to use it: run cafs as its owner")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        what = "world-writable" if mode & stat.S_IWOTH else "open to other users"
        raise StoreError(f"store {root} is {what} (mode {mode:04o}); refusing to use it: "
                         f"chmod 700 {root}")
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise StoreError(f"store {root} is not readable and writable by this user")
    _check_ancestors(root.resolve(), me)
    check_layout(root)


def _check_ancestors(real: Path, me: int) -> None:
    # A user who may write a directory above the store may rename the store (or a directory
    # on its way) and put their own in its place, between this check and any later open. A
    # sticky directory (like /tmp) lets them rename only what they own.
    for directory in real.parents:
        info = os.stat(directory)
        if info.st_uid not in (0, me):
            raise StoreError(f"directory {directory} above the store is owned by uid "
                             f"{info.st_uid}, who could replace the store; use a store in a "
                             "directory only you and root control")
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise StoreError(f"directory {directory} above the store is writable by other "
                             "users, who could replace the store; use a directory only you "
                             f"can write (chmod go-w) or a sticky one (chmod +t)")


def check_layout(root: Path) -> None:
    """Refuse a store whose layout entries are not what cafs itself would have made."""
    for name, kind in LAYOUT.items():
        _check_entry(root / name, kind)
    blobs = root / BLOBS_DIR
    if os.path.isdir(blobs):
        for shard in range(256):
            _check_entry(blobs / f"{shard:02x}", stat.S_IFDIR)


def _check_entry(path: Path, kind: int) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    refuse = "; refusing to use the store (remove it if you did not make it)"
    if stat.S_ISLNK(info.st_mode):
        raise StoreError(f"{path} is a symlink{refuse}")
    if stat.S_IFMT(info.st_mode) != kind:
        raise StoreError(f"{path} is not a {_TYPE_NAMES[kind]}{refuse}")
    if info.st_uid != os.geteuid():
        raise StoreError(f"{path} is owned by uid {info.st_uid}, not by this user{refuse}")
    if kind == stat.S_IFREG and info.st_nlink != 1:
        # A hard link to a file elsewhere: writing the store's file would write that one.
        raise StoreError(f"{path} has {info.st_nlink} hard links{refuse}")


def open_store_file(path: Path, flags: int) -> int:
    """Open (creating it 0600 if asked) a regular file of the store's layout: never through a
    symlink, never a file another user owns or that is linked elsewhere."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() \
                or info.st_nlink != 1:
            raise StoreError(f"{path} is not a regular file of this user's store; refusing to "
                             "use it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_log(root: Path) -> int:
    """The daemon's log file, for appending (the daemon's stdout and stderr)."""
    try:
        return open_store_file(root / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as exc:
        raise StoreError(f"cannot use store {root}: {root / LOG_NAME}: {exc.strerror}") from None


def create_manifest_file(path: Path) -> None:
    """Make the manifest 0600 before SQLite opens it (SQLite would make it 0644 less the umask,
    and gives its -wal and -shm files the mode of the database file); tighten one made looser
    by an older cafs."""
    try:
        os.close(open_store_file(path, os.O_RDONLY | os.O_CREAT))
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror}") from None
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(name).st_mode & 0o077:
                os.chmod(name, 0o600)


def manifest_location(root: Path) -> str | None:
    """The store's manifest on PostgreSQL, or None for <store>/manifest.sqlite: the URL given
    ($CAFS_MANIFEST: --manifest or the configuration file, see cafs.cli_common), else the one
    the store recorded at its first mount. A URL other than the recorded one, or one given for
    a store whose manifest is manifest.sqlite, is refused: either would start a second, empty
    manifest beside the blobs."""
    given = os.environ.get("CAFS_MANIFEST") or None
    if given:  # set by hand, it has not met --manifest's check: no password gets recorded
        check_manifest_location(given)
    try:
        fd = open_store_file(root / MANIFEST_URL_NAME, os.O_RDONLY)
    except FileNotFoundError:
        recorded = None
    except OSError as exc:
        raise StoreError(f"cannot read {root / MANIFEST_URL_NAME}: {exc.strerror}") from None
    else:
        try:
            recorded = os.read(fd, 4096).decode(errors="replace").strip() or None
        finally:
            os.close(fd)
    if given and recorded and given != recorded:
        raise StoreError(f"store {root} keeps its manifest at {recorded}, not {given} "
                         f"(see {root / MANIFEST_URL_NAME})")
    location = given or recorded
    if location and recorded is None:
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(root / MANIFEST_NAME).st_size:
                raise StoreError(f"store {root} keeps its manifest in {MANIFEST_NAME}; "
                                 f"refusing to start another at {location}")
    return location


def _local_store_id(root: Path, *, create: bool) -> str | None:
    """The id of a store whose manifest is manifest.sqlite, made at its first read-write
    open; None if it has none yet and this open is read-only."""
    path = root / STORE_ID_NAME
    try:
        fd = open_store_file(path, os.O_RDONLY)
    except FileNotFoundError:
        if not create:
            return None
        try:
            fd = open_store_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:  # another opener made it a moment ago
            return _local_store_id(root, create=False)
        made = str(uuid.uuid4())
        try:
            os.write(fd, f"{made}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return made
    try:
        return os.read(fd, 256).decode(errors="replace").strip() or None
    finally:
        os.close(fd)


def _claim(blobs: Blobs, store_id: str, manifest: Manifest, *, create: bool) -> None:
    try:
        blobs.claim(store_id, create=create)
    except BaseException:
        manifest.close()
        raise


def has_manifest(root: Path) -> bool:
    """Whether the store has a manifest: its file, or one on PostgreSQL."""
    return (root / MANIFEST_NAME).exists() or manifest_location(root) is not None


def _record_location(root: Path, location: str) -> None:
    path = root / MANIFEST_URL_NAME
    if path.exists():
        return
    fd = open_store_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, f"{location}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def check_manifest_files(root: Path, blobs: Blobs, *, wal: bool,
                         writable: bool = False) -> None:
    """Refuse to open a manifest that would silently lose committed artifacts: a missing or
    empty one beside existing blob files (SQLite would start a new, empty manifest and gc would
    then delete the blobs, the only copy left), a WAL damaged in its middle (SQLite's recovery
    would drop every commit after the damage), or, to open it read-write, a WAL lost after an
    unclean stop. Nothing is changed: the files stay as they are for recovery. Runs before
    SQLite opens anything (see cafs.wal)."""
    manifest = root / MANIFEST_NAME
    try:
        size: int | None = os.lstat(manifest).st_size
    except FileNotFoundError:
        size = None
    if not size and blobs.has_blob_files():
        state = "missing" if size is None else "empty (0 bytes)"
        raise NeedsRepair(
            f"store {root} needs repair: its manifest {MANIFEST_NAME} is {state}, yet blob files "
            "exist; refusing to start a new manifest over them (restore a backup with "
            f"'cafs restore --store {root}', see README: Recovery)")
    if wal:
        damage = check_wal(wal_path(manifest))
        if damage is not None:
            raise NeedsRepair(
                f"store {root} needs repair: the manifest's WAL {MANIFEST_NAME}-wal is damaged "
                f"({damage.describe()}); it is left untouched. Copy the store aside first, then "
                "see README: Recovery")
        if writable and size and _wal_expected(root) and not _wal_size(manifest):
            # Empty counts as lost: a read-only opener (fsck, a query) recreates it empty.
            # Read-only openers still run: fsck's LOST? list says what went missing.
            raise NeedsRepair(
                f"store {root} needs repair: the manifest's WAL {MANIFEST_NAME}-wal is missing "
                "after an unclean stop (the daemon had it open), so the commits in it are lost; "
                f"the store is left untouched. 'cafs fsck --store {root}' lists the lost "
                f"artifacts' blobs as LOST?; restore a backup with 'cafs restore --store {root}', "
                f"or accept the loss by removing {root / DIRTY_NAME} (see README: Recovery)")


def check_blobs_where(root: Path, blobs: Blobs, *, create: bool) -> None:
    """Refuse to open a store with its blobs looked for elsewhere than where they are (every
    blob would look missing: fsck --repair would mark all of them damaged). A new store
    records the place (`blobs-location`, only when it is not blobs/)."""
    try:
        fd = open_store_file(root / WHERE_NAME, os.O_RDONLY)
    except FileNotFoundError:
        recorded = None
    else:
        try:
            recorded = os.read(fd, 4096).decode(errors="replace").strip()
        finally:
            os.close(fd)
    exists = (root / MANIFEST_NAME).exists()
    if recorded is None and not exists:
        if create and blobs.where != LOCAL_WHERE:
            fd = open_store_file(root / WHERE_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                os.write(fd, f"{blobs.where}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        return
    recorded = recorded or LOCAL_WHERE
    if recorded != blobs.where:
        hint = ("set blobs in cafs.toml or pass --blobs" if recorded != LOCAL_WHERE
                else "leave blobs unset")
        raise StoreError(f"store {root} keeps its blobs at {recorded}, not {blobs.where}: "
                         f"{hint}")


def _wal_size(manifest: Path) -> int:
    try:
        return os.lstat(wal_path(manifest)).st_size
    except FileNotFoundError:
        return 0


def _wal_expected(root: Path) -> bool:
    """True if a daemon stopped uncleanly with the manifest open: its WAL must still exist."""
    try:
        fd = open_store_file(root / DIRTY_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return not os.read(fd, 64).startswith(WAL_CLOSED)
    finally:
        os.close(fd)


@dataclass
class Recovery:
    temp_files: int
    unpublished: int


@dataclass(frozen=True)
class RollBack:
    """What start-up did after a power loss (see Store.roll_back_unsynced)."""

    checked: int  # blobs stored after the last durable point, re-hashed
    damaged: tuple[str, ...]  # what was wrong with those that did not reach the disk whole
    artifacts: int  # artifacts rolled back to their previous version or left to be removed


def boot_id() -> str:
    """This boot of the kernel: a dirty marker written under another one means the machine
    went down (power loss, reset) and took the page cache with it, not only the daemon."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Store:
    """An opened store. `lock=True` (the daemon) holds the store's lock until close()."""

    def __init__(self, root: Path, manifest: Manifest, blobs: Blobs, lock_fd: int | None):
        self.root = root
        self.manifest = manifest
        self.blobs = blobs
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, root: Path, *, create: bool = True, lock: bool = False,
             compression_level: int = DEFAULT_LEVEL, owner: str = "",
             blobs: BlobsSpec | None = None, serving: bool = False) -> Store:
        root = real_store_path(root)
        prepare_store_dir(root, create=create)
        lock_fd = acquire_lock(root, owner) if lock else None
        try:
            blob_store = open_blob_store(root, blobs, level=compression_level)
            check_blobs_where(root, blob_store, create=create)
            location = manifest_location(root)
            if location is not None:
                return cls._open_remote(root, location, blob_store, lock_fd, create=create,
                                        serving=serving)
            # First: a new store on another store's shared blobs is refused as that, not as a
            # store whose manifest went missing.
            known_id = _local_store_id(root, create=False)
            blob_store.claim(known_id, create=False)
            # Only while no daemon writes the WAL (we hold the lock, or nobody does): a WAL being
            # appended to can show a frame half written.
            check_manifest_files(root, blob_store, wal=lock or store_holder(root) is None,
                                 writable=create)
            if create:
                blob_store.create_layout()
                create_manifest_file(root / MANIFEST_NAME)
            elif not (root / MANIFEST_NAME).exists():
                raise StoreError(f"no store at {root} (no {MANIFEST_NAME})")
            manifest = Manifest(root / MANIFEST_NAME, readonly=not create,
                                low_on_space=blob_store.space.low)
            # Only shared storage (not blobs/, which is this directory's own) is claimed.
            store_id = known_id or (_local_store_id(root, create=create)
                                    if blob_store.where != LOCAL_WHERE else None)
            if store_id is not None:
                _claim(blob_store, store_id, manifest, create=create)
            if lock and create:  # before a daemon's dirty marker says a WAL must exist
                manifest.start_wal()
            if create:
                # A quarter of the reserve: the WAL pages a checkpoint moves into the database
                # file never take the half of the reserve kept for deletes and gc.
                blob_store.space.statvfs()
                manifest.limit_wal(blob_store.space.reserve // 4)
                blob_store.space.manifest_room = manifest.claim_free_pages
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return cls(root, manifest, blob_store, lock_fd)

    @classmethod
    def _open_remote(cls, root: Path, location: str, blobs: Blobs, lock_fd: int | None, *,
                     create: bool, serving: bool) -> Store:
        """A store whose manifest is on PostgreSQL: the directory keeps the lock, the log, the
        control socket, tmp/ and the blobs (or their cache); no SQLite file, WAL or backups here."""
        from cafs.pg_manifest import PgManifest  # psycopg only for stores that use it

        if create:
            blobs.create_layout()
        manifest = PgManifest(location, readonly=not create,
                              new_schema_ok=not blobs.has_blob_files(), serving=serving,
                              adopting=not (root / MANIFEST_URL_NAME).exists(),
                              blobs_where=blobs.where)
        if manifest.store_id is not None:
            _claim(blobs, manifest.store_id, manifest, create=create)
        if create:
            _record_location(root, location)
        return cls(root, manifest, blobs, lock_fd)

    @property
    def keeps_backups(self) -> bool:
        """Whether cafs backs the manifest up (manifest.sqlite); on PostgreSQL pg_dump does."""
        return self.manifest_url is None

    @property
    def manifest_url(self) -> str | None:
        return getattr(self.manifest, "url", None)

    def recover(self) -> Recovery:
        """Start-up clean-up after any stop: no full scan, only what a crash can leave.

        Temp files are writes whose close() never returned; unpublished file rows are files whose
        first write never completed. Orphan blobs (renamed in, manifest not yet committed) are
        harmless garbage that `cafs fsck` reports.
        """
        return Recovery(self.blobs.clean_tmp(), self.manifest.remove_unpublished())

    def mark_dirty(self) -> bool:
        """Record that a daemon serves the store; True if the last one stopped uncleanly.
        The marker's presence is what counts: on a full disk its text may not fit, and that
        must not stop the mount."""
        path = self.root / DIRTY_NAME
        unclean = path.exists()
        try:
            fd = open_store_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        except OSError as exc:
            raise StoreError(f"cannot create {path}: {exc.strerror}") from None
        try:
            with contextlib.suppress(OSError):  # ENOSPC: an empty marker says the same
                os.write(fd, f"pid {os.getpid()} boot {boot_id()}\n".encode())
            os.fsync(fd)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return unclean

    def same_boot(self) -> bool:
        """True if the dirty marker a crashed daemon left was written during this boot: its
        blob files and WAL are then in the page cache, whole, whatever was synced. False if
        another boot wrote it, or it cannot be told (an older marker, `wal closed`)."""
        try:
            fd = open_store_file(self.root / DIRTY_NAME, os.O_RDONLY)
        except OSError:
            return False
        try:
            first = os.read(fd, 256).split(b"\n", 1)[0].split()
        finally:
            os.close(fd)
        current = boot_id()
        return (bool(current) and len(first) == 4 and first[0] == b"pid"
                and first[2] == b"boot" and first[3].decode(errors="replace") == current)

    def roll_back_unsynced(self) -> RollBack:
        """After a power loss: the blobs stored after the last durable point (the last group
        sync, see sync_durable) are re-hashed; versions holding one whose bytes did not reach
        the disk whole are dropped, their artifacts fall back to their previous version (or,
        with none, are removed by recover), and the damaged files go to quarantine/. Bounded
        by what one sync interval can write."""
        since = self.manifest.synced_ns()
        if since is None:  # never group-synced: every blob was fsynced when it was stored
            return RollBack(0, (), 0)
        recent = self.manifest.blobs_stored_after(since)
        bad = {blob.blob_id: (blob, problem) for blob in recent
               if (problem := self.content_problem(blob))}
        if not bad:
            return RollBack(len(recent), (), 0)
        changed = self.manifest.roll_back(sorted(bad), time.time_ns())
        for blob, _ in bad.values():
            self.blobs.quarantine(blob.digest)
        return RollBack(len(recent), tuple(problem for _, problem in bad.values()),
                        len(changed))

    def sync_durable(self) -> None:
        """A group sync: every blob file written so far, then the manifest with the durable
        point taken before the blobs were synced (a blob stored after it may not be on disk:
        an unclean start after a power loss checks those, see roll_back_unsynced)."""
        durable_ns = time.time_ns()
        self.blobs.sync_all()
        self.manifest.sync(durable_ns)

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
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise  # the process is short of resources, the blob is fine: no damage
            return f"blob {blob.digest}: unreadable: {exc.strerror}"
        if digest != blob.digest or size != blob.size:
            return f"blob {blob.digest}: content hashes to {digest}"
        return None

    def backup(self, keep: int = BACKUPS_KEPT) -> Path | None:
        """Copy the manifest to backups/ and drop all but the newest `keep` copies. Safe from a
        worker thread (its own connection). None if the reserve would not stay free: a backup
        never takes the space deletes and gc need."""
        if not self.keeps_backups:
            return None
        directory = self.root / BACKUP_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        try:
            self.blobs.space.take(os.stat(self.root / MANIFEST_NAME).st_size)
        except CafsError:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = directory / f"manifest-{stamp}.sqlite"
        self.manifest.copy_to(target)
        for old in list_backups(self.root)[:-keep]:
            old.unlink(missing_ok=True)
        return target

    def close(self) -> None:
        self.manifest.close()
        if self._lock_fd is not None and not self.manifest.readonly:
            note_wal_closed(self.root)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def note_wal_closed(root: Path) -> None:
    """After the manifest was closed cleanly (or replaced) under the lock: a dirty marker left
    by a crash no longer means a WAL must exist (see check_manifest_files)."""
    path = root / DIRTY_NAME
    try:
        fd = open_store_file(path, os.O_WRONLY)
    except OSError:  # no marker: nothing to note
        return
    try:
        # Longer than any "pid N" it overwrites; no truncate, which could leave it empty.
        os.pwrite(fd, WAL_CLOSED + f" by pid {os.getpid()}\n".encode(), 0)
        os.fsync(fd)
    except OSError:  # a full disk: no marker at all rather than one that expects a WAL
        with contextlib.suppress(OSError):
            os.unlink(path)
    finally:
        os.close(fd)


def list_backups(root: Path) -> list[Path]:
    """The manifest's backups, oldest first (their names sort by time)."""
    directory = root / BACKUP_DIR
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.glob("manifest-*.sqlite") if path.is_file())


def restore_manifest(root: Path, backup: Path | None) -> tuple[Path, Path]:
    """Put a backup back as the manifest of an unmounted store (holding its lock). The
    manifest files it replaces are moved to backups/replaced-<time>/, never deleted. Returns
    (the backup used, where the replaced files went)."""
    root = real_store_path(root)
    prepare_store_dir(root, create=False)
    if manifest_location(root) is not None:
        raise StoreError(f"store {root} keeps its manifest on PostgreSQL: restore it there "
                         "(pg_restore of a pg_dump); cafs makes no backups of it")
    if backup is None:
        found = list_backups(root)
        if not found:
            raise StoreError(f"store {root} has no manifest backups ({root / BACKUP_DIR})")
        backup = found[-1]
    elif not backup.is_file() and (root / BACKUP_DIR / backup.name).is_file():
        backup = root / BACKUP_DIR / backup.name
    if not backup.is_file():
        raise StoreError(f"no backup {backup}")
    lock_fd = acquire_lock(root, command_owner("restore"))
    try:
        try:
            check = Manifest(backup, readonly=True)
        except StoreError as exc:
            raise StoreError(f"backup {backup} is not usable: {exc}") from None
        try:
            problems = check.check_integrity()
        finally:
            check.close()
        if problems:
            raise StoreError(f"backup {backup} is damaged ({problems[0]})")
        aside = root / BACKUP_DIR / f"replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        aside.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = root / f"{MANIFEST_NAME}.restoring"
        copy_manifest(backup, partial)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(root / f"{MANIFEST_NAME}{suffix}", aside / f"{MANIFEST_NAME}{suffix}")
        os.rename(partial, root / MANIFEST_NAME)
        note_wal_closed(root)  # the backup has no WAL
        return backup, aside
    finally:
        os.close(lock_fd)


# -- the lock: who holds the store ----------------------------------------------------------
#
# The lock file holds one line, "pid <pid> <owner>", where owner is what `mount_owner` or
# `command_owner` made: written by `acquire_lock`, parsed by `store_holder`, nowhere else.
_MOUNTED_AT = "mounted at "


def mount_owner(mountpoint: Path) -> str:
    """The lock's owner text of a daemon serving a mount at `mountpoint`."""
    return f"{_MOUNTED_AT}{mountpoint.absolute()}"


def command_owner(command: str) -> str:
    """The lock's owner text of a `cafs` command working on an unmounted store."""
    return f"running cafs {command}"


@dataclass(frozen=True)
class LockHolder:
    """Who holds a store's lock, as its lock file tells."""

    pid: int | None  # None if the lock file's text was lost (a full disk) or unreadable
    # Where the holder serves the store; None for a `cafs` command (gc, import, restore).
    mountpoint: Path | None
    description: str  # for messages: "pid N mounted at M", "pid N running cafs gc"

    @property
    def serves_mount(self) -> bool:
        return self.mountpoint is not None


def acquire_lock(root: Path, owner: str) -> int:
    path = root / LOCK_NAME
    fd = open_store_file(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _parse_holder(os.pread(fd, 4096, 0))
        os.close(fd)
        raise StoreBusy(f"store {root} is in use ({holder.description})") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} {owner}".strip().encode() + b"\n", 0)
    except OSError:  # a full disk: the lock holds all the same, only its note is missing
        pass
    return fd


def store_holder(root: Path) -> LockHolder | None:
    """Who holds the store's lock (a daemon serving a mount, or a `cafs` command working on
    the unmounted store), or None if nobody does."""
    if not is_locked(root):
        return None
    try:
        fd = os.open(root / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            text = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        text = b""
    return _parse_holder(text)


def serving_daemon(root: Path) -> LockHolder | None:
    """The daemon serving the store through a mount, or None if it is not mounted (nobody
    holds it, or a `cafs` command does)."""
    holder = store_holder(root)
    return holder if holder is not None and holder.serves_mount else None


def _parse_holder(raw: bytes) -> LockHolder:
    text = raw.decode(errors="replace").strip()
    words = text.split(maxsplit=2)
    pid = int(words[1]) if words[:1] == ["pid"] and words[1:2] and words[1].isdigit() else None
    owner = words[2] if pid is not None and len(words) > 2 else ""
    mountpoint = Path(owner.removeprefix(_MOUNTED_AT)) if owner.startswith(_MOUNTED_AT) else None
    return LockHolder(pid, mountpoint, text or "by another process")


def is_locked(root: Path) -> bool:
    """True while anyone holds the store's lock (see store_holder for who)."""
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
