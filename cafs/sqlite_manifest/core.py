"""The SQLite manifest's connection: opening, transactions, durability, and errors.

Owns: the one sqlite3 connection of a manifest, its pragmas and migrations, the transaction
every change runs in, sync to disk, backups through SQLite's online backup API, and the rule
that no sqlite3.Error leaves the manifest: every public method of this class and of the parts
built on it (see `__init_subclass__`) turns one into a ManifestError with an errno, in one place
(`manifest_error`). Must not know the namespace's rules, touch blob files, FUSE or trio.

Concurrency rule: one connection, used from one thread. Every method that changes anything is one
transaction (`with self._transaction():`) and never yields to an event loop in between, so the
changes of one filesystem operation are atomic without locks. One exception, for speed: a new
file's row (add_node of a file) leaves its transaction open, and the next change that commits
(its publish, a group sync, anything) commits it too; meanwhile each change is a savepoint, and
a SQLite error rolls the whole transaction back (see _transaction, _abandoning). WAL checkpoints
run in a thread of their own (Checkpointer).

Durability: WAL with synchronous=NORMAL — a commit survives a crash of the process; `sync()`
makes everything committed so far survive power loss too, through SQLite itself (one small
commit with synchronous=FULL, which fsyncs the WAL). cafs never opens the manifest's files
itself: closing any descriptor of a file drops every POSIX lock the process holds on it, and the
next opener of the manifest would then believe it is alone and delete the WAL.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from cafs import schema
from cafs.errors import ManifestError, StoreError, translating
from cafs.model import SessionInfo

log = logging.getLogger(__name__)
# SQLite's own autocheckpoint threshold (pages), what limit_wal leaves on a roomy filesystem.
DEFAULT_WAL_PAGES = 1000
# A background checkpoint is asked for after this many commits (a small file's create and
# publish write ~25 WAL pages together: one checkpoint per ~100 files, ~3,000 pages, well
# inside the writer's own bound of ten times SQLite's 1000 pages).
CHECKPOINT_EVERY_COMMITS = 256


def manifest_error(exc: sqlite3.Error) -> ManifestError:
    """A failed SQLite call as an error with an errno: ENOSPC when the disk is full."""
    full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return ManifestError(f"manifest: {exc}", errno.ENOSPC if full else errno.EIO)


# Every sqlite3.Error becomes a ManifestError.
_guarded = translating(sqlite3.Error, manifest_error)


def _abandoning(method: Callable[..., Any]) -> Callable[..., Any]:
    """A failed SQLite call while a deferred change holds the transaction open (see
    SqliteCore._transaction) rolls that transaction back: after an I/O error SQLite wants a
    ROLLBACK before anything else, and a read failing there must not leave it half done."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def generator(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                yield from method(self, *args, **kwargs)
            except ManifestError as exc:
                self._abandon_after(exc)
                raise
        return generator

    @functools.wraps(method)
    def plain(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except ManifestError as exc:
            self._abandon_after(exc)
            raise
    return plain


def _guard_public_methods(cls: type) -> None:
    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(value):
            setattr(cls, name, _abandoning(_guarded(value)))


def copy_manifest(source: Path, target: Path, *, readonly_source: bool = True) -> None:
    """Copy a manifest with SQLite's online backup API into `target` (a new file, mode 0600):
    a consistent snapshot, taken through its own connection while the owner keeps committing
    (a reader in WAL mode blocks no writer). Safe from a worker thread. `target` is written
    under a temporary name, fsynced and renamed, so it is whole or absent."""
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    try:
        uri = f"file:{source}?mode=ro" if readonly_source else f"file:{source}"
        try:
            src = sqlite3.connect(uri, uri=True, check_same_thread=False)
            try:
                dst = sqlite3.connect(partial, check_same_thread=False)
                try:
                    src.backup(dst)
                    # A copy is one self-contained file (no WAL beside it) until used again.
                    dst.execute("PRAGMA journal_mode = DELETE")
                finally:
                    dst.close()
            finally:
                src.close()
        except sqlite3.Error as exc:
            raise manifest_error(exc) from exc
        # The copy is our own file, no connection holds it: opening it to fsync is safe.
        fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Checkpoints of the WAL in a thread of their own, through a connection of their own.

    Why: a checkpoint copies the WAL into the database file and fsyncs both (3-8 ms here).
    Done by SQLite's autocheckpoint it lands inside one commit every ~1000 pages, on the event
    loop, every other request waiting: measured, 1% of the commits of a small-file workload
    took 45% of all commit time. A PASSIVE checkpoint from another connection runs beside the
    writer (WAL mode lets it), and both the copy and the fsyncs release the GIL. The writer's
    autocheckpoint stays on, at a higher threshold, as the bound if this thread falls behind
    or fails. Opening a second connection is safe (SQLite shares one set of POSIX locks per
    file within a process; cafs.sqlite_manifest.copy_manifest does the same)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._wanted = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cafs-checkpoint",
                                            daemon=True)
            self._thread.start()
        self._wanted.set()

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        try:
            while True:
                self._wanted.wait()
                self._wanted.clear()
                if self._stop:
                    return
                try:
                    if db is None:
                        db = sqlite3.connect(self.path, isolation_level=None,
                                             check_same_thread=True)
                        db.execute("PRAGMA busy_timeout = 0")
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # the writer's autocheckpoint still bounds the WAL
                    log.info("background checkpoint of the manifest failed: %s", exc)
        finally:
            if db is not None:
                with suppress(sqlite3.Error):
                    db.close()

    def stop(self) -> None:
        """Ends the thread and closes its connection: the writer's close must be the last one
        (it then checkpoints and removes the WAL)."""
        self._stop = True
        self._wanted.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class SqliteCore:
    """The connection and its transactions; the parts of the manifest build on it."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _guard_public_methods(cls)

    def __init__(self, path: Path, *, readonly: bool = False,
                 low_on_space: Callable[[], bool] | None = None) -> None:
        self.path = path
        self.readonly = readonly
        # On a nearly full disk every commit first checkpoints, so the WAL restarts from its
        # beginning and reuses its space instead of growing: deletes and gc commit in the
        # space the reserve keeps for them.
        self._low_on_space = low_on_space
        try:
            if readonly:
                uri = f"file:{path}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None)
            else:
                self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
            self._db.execute("PRAGMA busy_timeout = 5000")
            # A bounded page cache (32 MiB) for the B-tree pages lookups keep touching.
            self._db.execute("PRAGMA cache_size = -32768")
            if not readonly:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
                # Some builds zero every freed page (SQLITE_SECURE_DELETE): deleting a file with
                # 1 MiB of tags would then write 1 MiB into the WAL, and a delete on a full disk
                # would fail. FAST zeroes only what costs no extra I/O.
                self._db.execute("PRAGMA secure_delete = FAST")
                self._db.execute("PRAGMA foreign_keys = ON")
                schema.migrate(Database(self._db))
            # Fail now, with a clear message, if the file is not a manifest at all.
            self._db.execute("SELECT count(*) FROM nodes WHERE id = 0").fetchone()
        except sqlite3.DatabaseError as exc:
            with suppress(OSError):
                fs = os.statvfs(path.parent)
                if fs.f_bavail * fs.f_frsize < 1 << 20:  # SQLite cannot even make its -shm
                    raise StoreError(f"{path}: cannot open the manifest: the store's filesystem "
                                     "is full; free space outside cafs first") from exc
            raise StoreError(f"{path}: not a usable cafs manifest ({exc})") from exc
        if readonly and not (self._has_column("blobs", "damaged_ns")
                             and self._has_column("nodes", "last_write_ns")):
            raise StoreError(f"{path} was written by an older cafs: mount the store once (or run "
                             "cafs fsck --repair) to upgrade it")
        self._changes = 0
        self._checkpointer: Checkpointer | None = None
        # A write transaction left open by a deferred change (see _transaction): committed with
        # the next change that commits. The node ids inserted since the last commit: if they
        # are lost with it, no later node may take their numbers (the kernel may know them);
        # _id_floor then lifts AUTOINCREMENT's counter above them.
        self._pending = False
        self._uncommitted_ids: list[int] = []
        self._id_floor = 0
        self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        # Bytes of free pages inside the file not yet promised (claim_free_pages); None: re-read
        # the free list (every commit may have used or freed pages).
        self._free_bytes: int | None = None

    @property
    def changes(self) -> int:
        """Bumped by every committed change: lets computed views (records) know they are
        stale."""
        return self._changes

    def limit_wal(self, size: int) -> None:
        """Checkpoint once the WAL holds about `size` bytes (SQLite's default is 1000 pages):
        what a checkpoint then adds to the database file is bounded by a share of the reserve
        on a small filesystem."""
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        pages = max(32, min(DEFAULT_WAL_PAGES, size // page_size))
        if pages < DEFAULT_WAL_PAGES or self.readonly:  # a small filesystem: bounded inline
            self._db.execute(f"PRAGMA wal_autocheckpoint = {pages}")
            return
        # Roomy: checkpoints go to a thread (see Checkpointer). The writer checkpoints itself
        # only past ten times the usual size: under a steady stream of commits the thread's
        # checkpoints never catch up with the last frame, so SQLite never rewinds the WAL and
        # it grows to that bound; the writer's checkpoint then finds little left to copy.
        self._db.execute(f"PRAGMA wal_autocheckpoint = {10 * pages}")
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(self.path)
            # Once now, at open: what is in the WAL (a new store's schema, its migrations)
            # goes into the database file, as SQLite's first autocheckpoint used to put it
            # there early, so a store whose WAL is lost later still opens and fsck can say
            # what went missing.
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def claim_free_pages(self, size: int) -> bool:
        """Whether a change adding about `size` bytes fits into the free pages inside
        manifest.sqlite (left by deletes and gc: SQLite fills them before it grows the file).
        If so they count as taken until the next commit, when the free list is read again."""
        if self._free_bytes is None:
            pages = self._db.execute("PRAGMA freelist_count").fetchone()[0]
            self._free_bytes = pages * self._page_size  # fixed once the file exists (WAL)
        if self._free_bytes < size:
            return False
        self._free_bytes -= size
        return True

    def start_wal(self) -> None:
        """Give an empty WAL its header now, by one commit that changes nothing: from here to a
        clean close the WAL is never empty, so after a crash a missing or empty one was lost
        (see cafs.store.check_manifest_files). Best effort: on a full disk it stays empty."""
        with suppress(OSError, sqlite3.Error):
            if os.stat(f"{self.path}-wal").st_size == 0:
                value = int(self._db.execute("PRAGMA application_id").fetchone()[0])
                self._db.execute(f"PRAGMA application_id = {value}")

    def _has_column(self, table: str, column: str) -> bool:
        rows = self._db.execute(f"PRAGMA table_info({table})").fetchall()
        return any(row[1] == column for row in rows)

    def _has_table(self, table: str) -> bool:
        return self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                (table,)).fetchone() is not None

    def close(self) -> None:
        with suppress(ManifestError):  # a new file's row, unpublished: start-up drops it anyway
            self.commit_pending()
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self._db.close()

    def admin(self) -> Database:
        """A sqlite-utils view of the same connection: for tests and by-hand inspection only;
        cafs itself asks the manifest's named methods."""
        return Database(self._db)

    @contextmanager
    def _transaction(self, *, commit: bool = True, defer: bool = False
                     ) -> Iterator[sqlite3.Connection]:
        """One write transaction; `commit=False` rolls it back at the end (a dry run).

        `defer=True`: the change is made but its commit waits for the next change that commits
        (or commit_pending), which then commits both at once, one commit instead of two. Only
        for changes nothing relies on after a crash: a new file's row before its first publish
        (start-up removes such rows anyway). While a deferred change is open, every change runs
        in a savepoint of that transaction: a change that fails is undone alone."""
        db = self._db
        try:
            if self._pending and self._low_on_space is not None and self._low_on_space():
                self.commit_pending()  # the checkpoint below needs no transaction open
            if self._pending:
                db.execute("SAVEPOINT change")
                try:
                    yield db
                    if not commit:
                        self._undo_change(None)
                        return
                    db.execute("RELEASE change")
                except BaseException as exc:
                    self._undo_change(exc)
                    raise
                if not defer:
                    self.commit_pending()
            else:
                if self._low_on_space is not None and self._low_on_space():
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                db.execute("BEGIN IMMEDIATE")
                try:
                    if self._id_floor:
                        self._lift_ids()
                    yield db
                    if not commit:
                        db.execute("ROLLBACK")
                        return
                    if defer:
                        self._pending = True
                    else:
                        db.execute("COMMIT")
                        self._committed()
                except BaseException:
                    # SQLite may already have rolled back (I/O error, disk full): then this
                    # fails.
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    self._lost()
                    raise
        except sqlite3.Error as exc:
            raise manifest_error(exc) from exc
        self._changes += 1
        self._free_bytes = None
        if self._checkpointer is not None and not self._changes % CHECKPOINT_EVERY_COMMITS:
            self._checkpointer.request()

    def commit_pending(self) -> None:
        """Commit a transaction a deferred change left open (see _transaction), if any."""
        if not self._pending:
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            self._lost()
            raise manifest_error(exc) from exc
        self._committed()

    def _undo_change(self, exc: BaseException | None) -> None:
        """A change inside the open transaction failed (or was a dry run): undo it alone. An
        error of SQLite itself other than a broken constraint (I/O, a full disk, a damaged
        page) rolls the whole transaction back, deferred changes included: after such an error
        SQLite wants a ROLLBACK, and going on inside the transaction (measured, under injected
        I/O faults) reads pages it calls malformed."""
        db = self._db
        cause = exc.__cause__ if isinstance(exc, ManifestError) else exc  # a public read's
        whole = isinstance(cause, sqlite3.Error) and not isinstance(cause, sqlite3.IntegrityError)
        if not whole:
            try:
                db.execute("ROLLBACK TO change")
                db.execute("RELEASE change")
            except sqlite3.Error:
                whole = True
        if whole or not db.in_transaction:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self._lost()

    def _abandon_after(self, exc: ManifestError) -> None:
        """See _abandoning: a SQLite error other than a broken constraint, while a deferred
        change is open, ends the open transaction (rolled back, its new ids never reused)."""
        cause = exc.__cause__
        if (self._pending and isinstance(cause, sqlite3.Error)
                and not isinstance(cause, sqlite3.IntegrityError)):
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            self._lost()

    def _committed(self) -> None:
        self._pending = False
        self._uncommitted_ids.clear()

    def _lost(self) -> None:
        """The open transaction was rolled back: the node ids it gave out stay unused."""
        self._pending = False
        if self._uncommitted_ids:
            self._id_floor = max(self._id_floor, *self._uncommitted_ids)
            self._uncommitted_ids.clear()

    def _lift_ids(self) -> None:
        """Inside a new transaction: AUTOINCREMENT's counter above every id given out and lost
        (it is part of the transaction, so a rollback took it back too)."""
        db = self._db
        if not db.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'nodes'",
                          (self._id_floor,)).rowcount:
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('nodes', ?)",
                       (self._id_floor,))

    def sync(self, durable_ns: int | None = None) -> None:
        """Make every committed transaction durable against power loss: one commit with
        synchronous=FULL fsyncs the WAL, and with it every frame committed before it.
        `durable_ns` (a group sync, after the blob files of its time were synced) is recorded
        as the new durable point: every blob stored before it is on disk; an fsync of one file
        leaves the point where it was."""
        db = self._db
        self.commit_pending()
        db.execute("PRAGMA synchronous = FULL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("UPDATE store_state SET synced_ns = coalesce(?, synced_ns)",
                           (durable_ns,))
                db.execute("COMMIT")
            except BaseException:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        finally:
            db.execute("PRAGMA synchronous = NORMAL")

    def synced_ns(self) -> int | None:
        """The durable point of the last group sync (see sync); None if there was none."""
        row = self._db.execute("SELECT max(synced_ns) FROM store_state").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def mark_checked(self, now_ns: int) -> None:
        """A daemon starts on this manifest, checked intact: orphan blob files older than now
        are what a crash left (see last_commit_ns)."""
        with self._transaction() as db:
            db.execute("UPDATE store_state SET checked_ns = ?", (now_ns,))

    def last_commit_ns(self) -> int:
        """When the manifest last recorded something: the newest blob or version row, durable
        point (fsync), or daemon start-up check. A blob file no row names that is newer than
        this was stored after everything the manifest knows: its row may have been lost."""
        row = self._db.execute(
            "SELECT max(coalesce((SELECT max(created_ns) FROM blobs), 0), "
            "coalesce((SELECT max(created_ns) FROM versions), 0))").fetchone()
        newest = row[0] or 0
        if self._has_table("store_state"):
            state = self._db.execute(
                "SELECT coalesce(max(synced_ns), 0), coalesce(max(checked_ns), 0) "
                "FROM store_state").fetchone()
            newest = max(newest, *state)
        return int(newest)

    def _lock_rows(self, nodes: list[int], digest: str | None = None) -> None:
        """Lock the rows a change reads and then writes, in one fixed order: nothing to do
        here (BEGIN IMMEDIATE holds the whole database); a server back end locks rows."""

    # -- several hosts: a manifest on SQLite serves one mount, so none of this applies ----

    shared = False
    session_id: int | None = None

    def set_session_timeout(self, seconds: float) -> None:
        """One mount, no sessions."""

    def set_session_where(self, host: str, mountpoint: str) -> None:
        """One mount, no sessions."""

    def live_sessions(self, timeout: float | None = None) -> list[SessionInfo]:
        """Mounts registered with the manifest: none on SQLite (one host, one mount)."""
        return []

    def unpublished_is_mine(self, node_id: int) -> bool:
        """Every unfinished file is this mount's own (no other mount shares the file)."""
        return True

    def pin(self, digest: str) -> int:
        """Writes in flight are pinned in the daemon's memory (Publisher.pinned): enough
        when one daemon serves the manifest."""
        return 0

    def unpin(self, digest: str, pin: int) -> None:
        """See pin."""

    def has_pending(self) -> bool:
        return False

    def send_pending(self) -> None:
        """Nothing waits: see pin."""

    def gc_lock(self) -> bool:
        """The store's lock already keeps gc to one daemon."""
        return True

    def gc_unlock(self) -> None:
        """See gc_lock."""

    def lock_for_delete(self, digests: list[str]) -> list[str]:
        """No other host pins anything: every digest may go."""
        return list(digests)

    def unlock_deleted(self, digests: list[str]) -> None:
        """See lock_for_delete."""

    def set_gc_grace(self, seconds: float) -> None:
        """Unreferenced blobs go at once on one host: no reader elsewhere needs them."""

    def _new_node_id(self, node_id: int) -> None:
        """A node id given out in the open transaction: if it is lost, no later node may get
        it (see _lift_ids)."""
        self._uncommitted_ids.append(node_id)

    def _last_node_id(self) -> int:
        """The largest node id ever given (AUTOINCREMENT's counter): an import gives its
        nodes the ids after it."""
        return int(self._db.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'nodes'), 0), "
            "(SELECT coalesce(max(id), 0) FROM nodes))").fetchone()[0])

    def check_integrity(self) -> list[str]:
        rows = self._db.execute("PRAGMA quick_check").fetchall()
        return [] if rows == [("ok",)] else [row[0] for row in rows]

    def copy_to(self, target: Path) -> None:
        """A backup: see copy_manifest. Uses its own connection, never this one, so it is safe
        from a worker thread."""
        copy_manifest(self.path, target)


_guard_public_methods(SqliteCore)
