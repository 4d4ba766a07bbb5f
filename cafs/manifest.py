"""The manifest: all SQL of cafs.

Owns: `manifest.sqlite` — the namespace under runs/ (nodes), the versions of every artifact,
the blobs' records and refcounts, and tags. Raw sqlite3 on the hot paths; sqlite-utils for
schema, migrations and admin. Must not touch blob files, FUSE or trio.

Concurrency rule: one connection, used from one thread. Every method that changes anything is one
transaction (`with self._transaction():`) and never yields to an event loop in between, so the
changes of one filesystem operation are atomic without locks.

Durability: WAL with synchronous=NORMAL — a commit survives a crash of the process; `sync()`
makes everything committed so far survive power loss too, through SQLite itself (one small
commit with synchronous=FULL, which fsyncs the WAL). cafs never opens the manifest's files
itself: closing any descriptor of a file drops every POSIX lock the process holds on it, and the
next opener of the manifest would then believe it is alone and delete the WAL.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlite_utils import Database

from cafs import crashpoints, schema
from cafs.digest import Digest
from cafs.errors import AlreadyExists, Corrupt, ManifestError, StoreError
from cafs.model import RUNS_INODE, BlobRef, Kind, Node, StoredBlob, TreeEntry, Version

T = TypeVar("T")

_NODE_COLUMNS = """
    n.id, n.parent_id, n.name, n.kind, n.mode, n.uid, n.gid, n.mtime_ns, n.ctime_ns, n.nlink,
    n.version_id, b.id, b.sha256, b.size, b.stored_size, b.encoding, b.damaged_ns, n.sealed_ns
"""
_NODE_FROM = """
    FROM nodes n LEFT JOIN versions v ON v.id = n.version_id LEFT JOIN blobs b ON b.id = v.blob_id
"""
_BLOB_COLUMNS = "id, sha256, size, stored_size, encoding, damaged_ns"
_VERSION_COLUMNS = """
    v.id, v.node_id, v.path, b.sha256, v.size, v.mode, v.uid, v.gid, v.mtime_ns, v.ctime_ns,
    v.content_type, v.created_ns, v.replaced_ns, b.damaged_ns
"""
# What a blob's refcount must be: the live artifacts whose current version holds it.
_LIVE_REFS = """
    live(blob_id, n) AS (
        SELECT v.blob_id, count(*) FROM nodes n
        JOIN versions v ON v.id = n.version_id WHERE n.kind = 'file' GROUP BY v.blob_id
    )
"""
# Files whose first write never completed (the daemon died before their first publish).
_DELETE_UNPUBLISHED = "DELETE FROM nodes WHERE kind = 'file' AND version_id IS NULL"
# Every node below a directory (not the directory itself), with its path below it.
_SUBTREE = """
    WITH RECURSIVE sub(id, rel) AS (
        SELECT id, name FROM nodes WHERE parent_id = :top
        UNION ALL
        SELECT n.id, sub.rel || '/' || n.name FROM nodes n JOIN sub ON n.parent_id = sub.id
    )
"""


def _node(row: tuple) -> Node:
    blob = (BlobRef(row[11], Digest(row[12]), row[13], row[14], row[15], row[16] is not None)
            if row[11] else None)
    return Node(
        ino=row[0],
        parent=row[1],
        name=row[2],
        kind=Kind(row[3]),
        mode=row[4],
        uid=row[5],
        gid=row[6],
        mtime_ns=row[7],
        ctime_ns=row[8],
        nlink=row[9],
        version_id=row[10],
        blob=blob,
        sealed_ns=row[17],
    )


def _blob(row: tuple) -> BlobRef:
    return BlobRef(row[0], Digest(row[1]), row[2], row[3], row[4], row[5] is not None)


def _version(row: tuple) -> Version:
    return Version(row[0], row[1], row[2], Digest(row[3]), row[4], row[5], row[6], row[7], row[8],
                   row[9], row[10], row[11], row[12], row[13] is not None)


def _marks(chunk: list) -> str:
    """The placeholders of an IN (...) list."""
    return ",".join("?" * len(chunk))


def _chunks(items: list[T], size: int = 500) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass(frozen=True)
class Totals:
    artifacts: int
    blobs: int
    logical_bytes: int  # sum of the sizes of live artifacts (what a plain copy would need)
    unique_bytes: int  # sum of the sizes of distinct contents (after dedup, before compression)
    stored_bytes: int  # sum of blob file sizes on disk
    versions: int
    executions: int
    layers: int


@dataclass(frozen=True)
class DirStats:
    """What a layer's or execution's record says about the artifacts below it: the aggregate
    columns of its row (schema m004), kept up to date by every change."""

    artifacts: int
    logical_bytes: int  # sum of their sizes
    first_write_ns: int | None  # the oldest version of anything below it
    last_write_ns: int | None  # the newest


@dataclass(frozen=True)
class SharingStats:
    """What deleting a directory would reclaim: needs every content below it grouped and
    compared with its refcount, O(artifacts below it). Computed on demand by `cafs stats PATH`
    (never by records, never on the daemon's event loop)."""

    artifacts: int
    logical_bytes: int
    unique_bytes: int  # sizes of contents no artifact outside this directory holds
    unique_stored_bytes: int  # what deleting the directory and running gc would reclaim


@dataclass(frozen=True)
class GcPlan:
    versions: int  # version rows removed
    blobs: list[BlobRef]  # blob rows removed: their files can go


@dataclass(frozen=True)
class RepairPlan:
    damaged: list[int]  # blob ids whose file is missing or wrong: mark damaged
    sound: list[int]  # blob ids checked sound: clear an earlier damaged mark
    drift: bool  # recompute refcounts that differ from the live artifacts
    remove_unpublished: bool  # drop files whose first write never completed (not mounted)


@dataclass(frozen=True)
class NewVersion:
    """Everything a publish records besides the blob."""

    node_id: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    content_type: str | None
    now_ns: int
    # An earlier version published through the same open file: it leaves history.
    collapses: int | None = None


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
        src = sqlite3.connect(uri, uri=True, check_same_thread=False)
        try:
            dst = sqlite3.connect(partial, check_same_thread=False)
            try:
                src.backup(dst)
                # A copy is one self-contained file (no WAL beside it) until it is used again.
                dst.execute("PRAGMA journal_mode = DELETE")
            finally:
                dst.close()
        finally:
            src.close()
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


def manifest_error(exc: sqlite3.Error) -> ManifestError:
    """A failed SQLite call as an error with an errno: ENOSPC when the disk is full."""
    full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return ManifestError(f"manifest: {exc}", errno.ENOSPC if full else errno.EIO)


class Manifest:
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
        # Bumped by every committed change: lets computed views (records) know they are stale.
        self.changes = 0

    def limit_wal(self, size: int) -> None:
        """Checkpoint once the WAL holds about `size` bytes (SQLite's default is 1000 pages):
        what a checkpoint then adds to the database file is bounded by a share of the reserve
        on a small filesystem."""
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        pages = max(32, min(1000, size // page_size))
        self._db.execute(f"PRAGMA wal_autocheckpoint = {pages}")

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

    def close(self) -> None:
        self._db.close()

    def admin(self) -> Database:
        """A sqlite-utils view of the same connection, for admin commands."""
        return Database(self._db)

    @contextmanager
    def _transaction(self, *, commit: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; `commit=False` rolls it back at the end (a dry run)."""
        try:
            if self._low_on_space is not None and self._low_on_space():
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                if not commit:
                    self._db.execute("ROLLBACK")
                    return
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back (I/O error, disk full): then this fails.
                with suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise manifest_error(exc) from exc
        self.changes += 1

    def sync(self) -> None:
        """Make every committed transaction durable against power loss: one commit with
        synchronous=FULL fsyncs the WAL, and with it every frame committed before it."""
        db = self._db
        try:
            db.execute("PRAGMA synchronous = FULL")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute("UPDATE store_state SET synced_ns = ?", (time.time_ns(),))
                    db.execute("COMMIT")
                except BaseException:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise
            finally:
                db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise manifest_error(exc) from exc

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

    def _has_table(self, table: str) -> bool:
        return self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                (table,)).fetchone() is not None

    def check_integrity(self) -> list[str]:
        rows = self._db.execute("PRAGMA quick_check").fetchall()
        return [] if rows == [("ok",)] else [row[0] for row in rows]

    # -- namespace reads ------------------------------------------------------------------

    def node(self, node_id: int) -> Node | None:
        row = self._db.execute(
            f"SELECT {_NODE_COLUMNS} {_NODE_FROM} WHERE n.id = ?", (node_id,)
        ).fetchone()
        return _node(row) if row else None

    def child(self, parent_id: int, name: str) -> Node | None:
        row = self._db.execute(
            f"SELECT {_NODE_COLUMNS} {_NODE_FROM} WHERE n.parent_id = ? AND n.name = ?",
            (parent_id, name),
        ).fetchone()
        return _node(row) if row else None

    def children(self, parent_id: int, after_id: int, limit: int) -> list[Node]:
        """A page of a directory, in id order (stable while entries come and go)."""
        rows = self._db.execute(
            f"SELECT {_NODE_COLUMNS} {_NODE_FROM} WHERE n.parent_id = ? AND n.id > ? "
            "ORDER BY n.id LIMIT ?",
            (parent_id, after_id, limit),
        ).fetchall()
        return [_node(row) for row in rows]

    def has_children(self, parent_id: int) -> bool:
        row = self._db.execute("SELECT 1 FROM nodes WHERE parent_id = ? LIMIT 1", (parent_id,))
        return row.fetchone() is not None

    def count_executions(self) -> int:
        return self._db.execute(
            "SELECT count(*) FROM nodes WHERE parent_id = ?", (RUNS_INODE,)
        ).fetchone()[0]

    def path_of(self, node_id: int) -> str:
        """The path of a node relative to the mount, e.g. runs/e1/train/model.bin."""
        rows = self._db.execute(
            """
            WITH RECURSIVE up(id, parent_id, name, depth) AS (
                SELECT id, parent_id, name, 0 FROM nodes WHERE id = ?
                UNION ALL
                SELECT n.id, n.parent_id, n.name, up.depth + 1
                FROM nodes n JOIN up ON n.id = up.parent_id
            )
            SELECT name FROM up ORDER BY depth DESC
            """,
            (node_id,),
        ).fetchall()
        return "/".join(["runs", *(row[0] for row in rows)])

    # -- namespace changes ----------------------------------------------------------------

    def add_node(
        self, parent_id: int, name: str, kind: Kind, mode: int, uid: int, gid: int, now_ns: int
    ) -> Node:
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO nodes (parent_id, name, kind, mode, uid, gid, mtime_ns, ctime_ns, "
                "nlink) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (parent_id, name, kind.value, mode, uid, gid, now_ns, now_ns,
                 2 if kind.is_dir else 1),
            )
            if kind.is_dir:
                self._adjust_nlink(parent_id, +1)
            self._touch(parent_id, now_ns)
        node = self.node(cursor.lastrowid or 0)
        assert node is not None
        return node

    def set_attrs(
        self, node_id: int, *, mode: int, uid: int, gid: int, mtime_ns: int, ctime_ns: int
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE nodes SET mode = ?, uid = ?, gid = ?, mtime_ns = ?, ctime_ns = ? "
                "WHERE id = ?",
                (mode, uid, gid, mtime_ns, ctime_ns, node_id),
            )

    def remove_node(self, node: Node, now_ns: int) -> None:
        """Unlink a file or remove an (empty) directory: the versions stay as history."""
        with self._transaction():
            self._drop_node(node, now_ns)
            self._touch(node.parent, now_ns)

    def rename(self, node: Node, new_parent: int, new_name: str, replaced: Node | None,
               now_ns: int) -> None:
        with self._transaction() as db:
            if replaced is not None:
                self._drop_node(replaced, now_ns)
            db.execute(
                "UPDATE nodes SET parent_id = ?, name = ?, ctime_ns = ? WHERE id = ?",
                (new_parent, new_name, now_ns, node.ino),
            )
            if node.kind.is_dir and new_parent != node.parent:
                self._adjust_nlink(node.parent, -1)
                self._adjust_nlink(new_parent, +1)
            self._aggregate_moved(node.ino, node.parent, new_parent)
            self._touch(node.parent, now_ns)
            if new_parent != node.parent:
                self._touch(new_parent, now_ns)

    def remove_unpublished(self) -> int:
        """Drop files whose first write never completed (start-up after a crash)."""
        with self._transaction() as db:
            cursor = db.execute(_DELETE_UNPUBLISHED)
        return cursor.rowcount

    def _drop_node(self, node: Node, now_ns: int) -> None:
        db = self._db
        # The row's own version, not the caller's copy of it: a copy can be stale, and a
        # reference must never be left behind (nor dropped twice). No version: no-ops.
        current = "(SELECT version_id FROM nodes WHERE id = ?)"
        db.execute(f"UPDATE versions SET replaced_ns = ? WHERE id = {current}",
                   (now_ns, node.ino))
        db.execute("UPDATE blobs SET refcount = refcount - 1 WHERE id = "
                   f"(SELECT blob_id FROM versions WHERE id = {current})", (node.ino,))
        db.execute("DELETE FROM tags WHERE node_id = ?", (node.ino,))
        gone = db.execute("DELETE FROM nodes WHERE id = ? RETURNING parent_id, artifacts, "
                          "logical_bytes, first_write_ns, last_write_ns", (node.ino,)).fetchall()
        for parent, artifacts, logical_bytes, first, last in gone:
            self._aggregate_up(parent, -artifacts, -logical_bytes, (first, last), (None, None))
        if node.kind.is_dir:
            self._adjust_nlink(node.parent, -1)

    def _adjust_nlink(self, node_id: int, delta: int) -> None:
        self._db.execute("UPDATE nodes SET nlink = nlink + ? WHERE id = ?", (delta, node_id))

    def _touch(self, node_id: int, now_ns: int) -> None:
        """A directory's entries changed: bump its mtime and ctime."""
        self._db.execute(
            "UPDATE nodes SET mtime_ns = ?, ctime_ns = ? WHERE id = ?", (now_ns, now_ns, node_id)
        )

    # -- content --------------------------------------------------------------------------

    def blob(self, digest: Digest) -> BlobRef | None:
        row = self._db.execute(
            f"SELECT {_BLOB_COLUMNS} FROM blobs WHERE sha256 = ?", (digest,)
        ).fetchone()
        return _blob(row) if row else None

    def blob_by_id(self, blob_id: int) -> BlobRef | None:
        row = self._db.execute(
            f"SELECT {_BLOB_COLUMNS} FROM blobs WHERE id = ?", (blob_id,)
        ).fetchone()
        return _blob(row) if row else None

    def blobs_page(self, after_id: int, limit: int) -> list[BlobRef]:
        rows = self._db.execute(
            f"SELECT {_BLOB_COLUMNS} FROM blobs WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [_blob(row) for row in rows]

    def blob_created_ns(self, blob_id: int) -> int:
        row = self._db.execute("SELECT created_ns FROM blobs WHERE id = ?", (blob_id,)).fetchone()
        return row[0] if row else 0

    def refcount(self, blob_id: int) -> int:
        row = self._db.execute("SELECT refcount FROM blobs WHERE id = ?", (blob_id,)).fetchone()
        return row[0] if row else 0

    def publish(self, stored: StoredBlob, new: NewVersion) -> Node:
        """Record a new version of an artifact, in one transaction.

        `stored` is either a blob just written, or (dedup) one the manifest already has.
        The artifact's previous version, if any, is marked replaced and its blob loses a
        reference; the new blob gains one.
        """
        with self._transaction() as db:
            path = self.path_of(new.node_id)
            blob_id = self._upsert_blob(stored, new.now_ns, references=1)
            old = db.execute(
                "SELECT version_id FROM nodes WHERE id = ?", (new.node_id,)
            ).fetchone()
            if old is None:
                raise Corrupt(f"node {new.node_id} vanished while being published")
            if old[0] is not None:
                db.execute(
                    "UPDATE versions SET replaced_ns = ? WHERE id = ?", (new.now_ns, old[0])
                )
                db.execute(
                    "UPDATE blobs SET refcount = refcount - 1 WHERE id = "
                    "(SELECT blob_id FROM versions WHERE id = ?)",
                    (old[0],),
                )
            version_id = db.execute(
                "INSERT INTO versions (node_id, path, blob_id, size, mode, uid, gid, mtime_ns, "
                "ctime_ns, content_type, created_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (new.node_id, path, blob_id, stored.size, new.mode, new.uid, new.gid,
                 new.mtime_ns, new.ctime_ns, new.content_type, new.now_ns),
            ).lastrowid
            db.execute(
                "UPDATE nodes SET version_id = ?, mtime_ns = ?, ctime_ns = ? WHERE id = ?",
                (version_id, new.mtime_ns, new.ctime_ns, new.node_id),
            )
            if new.collapses is not None:
                db.execute("DELETE FROM versions WHERE id = ? AND node_id = ? AND "
                           "replaced_ns IS NOT NULL", (new.collapses, new.node_id))
            self._aggregate_file(new.node_id)
            crashpoints.reached("before-manifest-commit")
        crashpoints.reached("after-manifest-commit")
        node = self.node(new.node_id)
        assert node is not None
        return node

    # -- tags -----------------------------------------------------------------------------

    def tag_usage(self, node_id: int, *, excluding: str) -> tuple[int, int]:
        """Bytes of a node's tag names (each with its NUL, as listxattr returns them) and
        values, leaving out the tag `excluding` (about to be replaced)."""
        row = self._db.execute(
            "SELECT coalesce(sum(length(CAST(name AS BLOB)) + 1), 0), "
            "coalesce(sum(length(value)), 0) FROM tags WHERE node_id = ? AND name != ?",
            (node_id, excluding),
        ).fetchone()
        return row[0], row[1]

    def tag(self, node_id: int, name: str) -> bytes | None:
        row = self._db.execute(
            "SELECT value FROM tags WHERE node_id = ? AND name = ?", (node_id, name)
        ).fetchone()
        return bytes(row[0]) if row else None

    def tag_names(self, node_id: int) -> list[str]:
        rows = self._db.execute(
            "SELECT name FROM tags WHERE node_id = ? ORDER BY name", (node_id,)
        ).fetchall()
        return [row[0] for row in rows]

    def set_tag(self, node_id: int, name: str, value: bytes, now_ns: int) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO tags (node_id, name, value) VALUES (?, ?, ?) "
                "ON CONFLICT (node_id, name) DO UPDATE SET value = excluded.value",
                (node_id, name, value),
            )
            db.execute("UPDATE nodes SET ctime_ns = ? WHERE id = ?", (now_ns, node_id))

    def remove_tag(self, node_id: int, name: str, now_ns: int) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM tags WHERE node_id = ? AND name = ?", (node_id, name)
            )
            db.execute("UPDATE nodes SET ctime_ns = ? WHERE id = ?", (now_ns, node_id))
        return cursor.rowcount > 0

    # -- statistics and checks ------------------------------------------------------------

    def totals(self) -> Totals:
        db = self._db
        artifacts, logical = db.execute(
            "SELECT count(*), coalesce(sum(v.size), 0) FROM nodes n "
            "JOIN versions v ON v.id = n.version_id WHERE n.kind = 'file'"
        ).fetchone()
        blobs, unique, stored = db.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(stored_size), 0) FROM blobs"
        ).fetchone()
        versions = db.execute("SELECT count(*) FROM versions").fetchone()[0]
        executions = db.execute(
            "SELECT count(*) FROM nodes WHERE kind = 'execution'"
        ).fetchone()[0]
        layers = db.execute("SELECT count(*) FROM nodes WHERE kind = 'layer'").fetchone()[0]
        return Totals(artifacts, blobs, logical, unique, stored, versions, executions, layers)

    def newest_blobs(self, limit: int) -> list[BlobRef]:
        rows = self._db.execute(
            f"SELECT {_BLOB_COLUMNS} FROM blobs ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [_blob(row) for row in rows]

    def all_blobs(self) -> Iterator[BlobRef]:
        yield from (_blob(row) for row in self._db.execute(
            f"SELECT {_BLOB_COLUMNS} FROM blobs ORDER BY id"))

    def refcount_drift(self) -> list[tuple[str, int, int]]:
        """Blobs whose recorded refcount differs from the live artifacts using them."""
        rows = self._db.execute(
            f"""
            WITH {_LIVE_REFS}
            SELECT b.sha256, b.refcount, coalesce(live.n, 0) FROM blobs b
            LEFT JOIN live ON live.blob_id = b.id
            WHERE b.refcount != coalesce(live.n, 0)
            """
        ).fetchall()
        return [(row[0], row[1], row[2]) for row in rows]

    def dangling(self) -> list[str]:
        """Structural problems: rows that point at rows that do not exist."""
        db = self._db
        problems = []
        for (node_id,) in db.execute(
            "SELECT n.id FROM nodes n LEFT JOIN versions v ON v.id = n.version_id "
            "WHERE n.version_id IS NOT NULL AND v.id IS NULL"
        ):
            problems.append(f"node {node_id}: its current version is missing")
        for (version_id,) in db.execute(
            "SELECT v.id FROM versions v LEFT JOIN blobs b ON b.id = v.blob_id WHERE b.id IS NULL"
        ):
            problems.append(f"version {version_id}: its blob row is missing")
        for (node_id,) in db.execute(
            "SELECT n.id FROM nodes n LEFT JOIN nodes p ON p.id = n.parent_id "
            "WHERE n.parent_id != ? AND p.id IS NULL",
            (RUNS_INODE,),
        ):
            problems.append(f"node {node_id}: its parent directory is missing")
        return problems

    def unpublished_count(self) -> int:
        return self._db.execute(
            "SELECT count(*) FROM nodes WHERE kind = 'file' AND version_id IS NULL"
        ).fetchone()[0]

    # -- life cycle: lookups by path, history, queries -------------------------------------

    def resolve(self, path: str) -> Node | None:
        """The node at a path relative to the mount (runs/<exec>/...), or None."""
        parts = path.strip("/").split("/")
        if parts[0] != "runs" or len(parts) < 2:
            return None
        node: Node | None = None
        parent = RUNS_INODE
        for name in parts[1:]:
            node = self.child(parent, name)
            if node is None:
                return None
            parent = node.ino
        return node

    def subtree(self, top: int) -> Iterator[tuple[str, Node]]:
        """Every node below a directory, parents before children, with its path below it."""
        rows = self._db.execute(
            f"{_SUBTREE} SELECT sub.rel, {_NODE_COLUMNS} FROM sub JOIN nodes n ON n.id = sub.id "
            "LEFT JOIN versions v ON v.id = n.version_id LEFT JOIN blobs b ON b.id = v.blob_id "
            "ORDER BY sub.rel",
            {"top": top},
        )
        for row in rows:
            yield row[0], _node(row[1:])

    def history(self, node_id: int | None, path: str) -> list[Version]:
        """The versions of the artifact at `path`: every version of the node there now, and
        versions published at that path by nodes since replaced (an rsync or `mv` over it)."""
        rows = self._db.execute(
            f"SELECT {_VERSION_COLUMNS} FROM versions v JOIN blobs b ON b.id = v.blob_id "
            "WHERE v.node_id = ? OR v.path = ? ORDER BY v.id",
            (node_id if node_id is not None else -1, path),
        ).fetchall()
        return [_version(row) for row in rows]

    def tags_of(self, node_id: int) -> dict[str, bytes]:
        rows = self._db.execute(
            "SELECT name, value FROM tags WHERE node_id = ? ORDER BY name", (node_id,)
        ).fetchall()
        return {row[0]: bytes(row[1]) for row in rows}

    def tags_up_to(self, node_id: int, largest: int) -> Iterator[tuple[str, bytes | None]]:
        """A node's tags in name order, one row at a time; a value longer than `largest`
        bytes comes as None (not read into memory)."""
        rows = self._db.execute(
            "SELECT name, CASE WHEN length(value) <= ? THEN value END FROM tags "
            "WHERE node_id = ? ORDER BY name", (largest, node_id))
        for name, value in rows:
            yield name, None if value is None else bytes(value)

    def nodes_tagged(self, name: str, value: bytes | None) -> set[int]:
        if value is None:
            rows = self._db.execute("SELECT node_id FROM tags WHERE name = ?", (name,))
        else:
            rows = self._db.execute(
                "SELECT node_id FROM tags WHERE name = ? AND value = ?", (name, value)
            )
        return {row[0] for row in rows}

    def nodes_holding(self, digest: str) -> set[int]:
        """Live artifacts whose current content is this digest."""
        rows = self._db.execute(
            "SELECT n.id FROM blobs b JOIN versions v ON v.blob_id = b.id "
            "JOIN nodes n ON n.version_id = v.id WHERE b.sha256 = ?",
            (digest,),
        )
        return {row[0] for row in rows}

    def nodes_holding_blobs(self, blob_ids: list[int]) -> list[int]:
        found: list[int] = []
        for chunk in _chunks(blob_ids):
            found += [row[0] for row in self._db.execute(
                f"SELECT n.id FROM versions v JOIN nodes n ON n.version_id = v.id "
                f"WHERE v.blob_id IN ({_marks(chunk)})", chunk)]
        return found

    def dir_stats(self, top: int) -> DirStats:
        """Aggregates over the artifacts below a directory: its row's aggregate columns."""
        row = self._db.execute(
            "SELECT artifacts, logical_bytes, first_write_ns, last_write_ns FROM nodes "
            "WHERE id = ?", (top,)
        ).fetchone()
        return DirStats(*row) if row else DirStats(0, 0, None, None)

    def sharing_stats(self, top: int) -> SharingStats:
        """Artifacts below a directory and the contents only they hold: one query over the
        whole subtree (no rows to Python), O(artifacts below it)."""
        row = self._db.execute(
            f"""{_SUBTREE},
            cur AS (
                SELECT v.blob_id, v.size FROM sub JOIN nodes n ON n.id = sub.id
                JOIN versions v ON v.id = n.version_id WHERE n.kind = 'file'
            ),
            held AS (SELECT blob_id, count(*) AS uses FROM cur GROUP BY blob_id)
            SELECT * FROM
                (SELECT count(*), coalesce(sum(size), 0) FROM cur),
                (SELECT coalesce(sum(b.size), 0), coalesce(sum(b.stored_size), 0)
                 FROM held JOIN blobs b ON b.id = held.blob_id WHERE b.refcount <= held.uses)
            """,
            {"top": top},
        ).fetchone()
        return SharingStats(*row)

    # -- aggregates (schema m004): kept inside the transaction of every change -------------

    def _aggregate_file(self, node_id: int) -> None:
        """Re-read a file's aggregate columns from its versions and carry the change up."""
        before = self._db.execute(
            "SELECT parent_id, artifacts, logical_bytes, first_write_ns, last_write_ns "
            "FROM nodes WHERE id = ?", (node_id,)
        ).fetchone()
        if before is None:
            return
        after = self._db.execute(
            """
            UPDATE nodes SET
                artifacts = (version_id IS NOT NULL),
                logical_bytes = coalesce(
                    (SELECT size FROM versions v WHERE v.id = nodes.version_id), 0),
                first_write_ns = (SELECT min(created_ns) FROM versions v WHERE v.node_id = ?1),
                last_write_ns = (SELECT max(created_ns) FROM versions v WHERE v.node_id = ?1)
            WHERE id = ?1 RETURNING artifacts, logical_bytes, first_write_ns, last_write_ns
            """,
            (node_id,),
        ).fetchall()[0]
        self._aggregate_up(before[0], after[0] - before[1], after[1] - before[2],
                           (before[3], before[4]), (after[2], after[3]))

    def _aggregate_up(self, dir_id: int, artifacts: int, logical_bytes: int,
                      old: tuple[int | None, int | None] = (None, None),
                      new: tuple[int | None, int | None] = (None, None)) -> None:
        """A child of `dir_id` changed by these deltas, its times from `old` to `new`: update
        `dir_id` and every ancestor up to runs/."""
        (old_first, old_last), (new_first, new_last) = old, new
        if ((old_first is None or (new_first is not None and new_first <= old_first))
                and (old_last is None or (new_last is not None and new_last >= old_last))):
            # The child's times only widened (a publish, a move in): every ancestor's min and
            # max can only widen too. One statement for the whole chain.
            self._db.execute(
                """
                WITH RECURSIVE up(id) AS (
                    SELECT ?1 WHERE ?1 != ?6
                    UNION ALL
                    SELECT n.parent_id FROM nodes n JOIN up ON n.id = up.id
                    WHERE n.parent_id != ?6
                )
                UPDATE nodes SET
                    artifacts = artifacts + ?2, logical_bytes = logical_bytes + ?3,
                    first_write_ns = coalesce(min(first_write_ns, ?4), first_write_ns, ?4),
                    last_write_ns = coalesce(max(last_write_ns, ?5), last_write_ns, ?5)
                WHERE id IN (SELECT id FROM up)
                """,
                (dir_id, artifacts, logical_bytes, new_first, new_last, RUNS_INODE),
            )
            return
        # Times shrank (an unlink, a move out, gc): a minimum cannot be undone by a
        # subtraction, so each ancestor's times are re-read from its children (one index seek
        # each).
        while dir_id != RUNS_INODE:
            rows = self._db.execute(
                """
                UPDATE nodes SET
                    artifacts = artifacts + ?2, logical_bytes = logical_bytes + ?3,
                    first_write_ns = (SELECT min(c.first_write_ns) FROM nodes c
                                      WHERE c.parent_id = ?1),
                    last_write_ns = (SELECT max(c.last_write_ns) FROM nodes c
                                     WHERE c.parent_id = ?1)
                WHERE id = ?1 RETURNING parent_id
                """,
                (dir_id, artifacts, logical_bytes),
            ).fetchall()
            if not rows:
                return
            dir_id = rows[0][0]

    def _aggregate_moved(self, node_id: int, old_parent: int, new_parent: int) -> None:
        """A node (and its subtree) moved from one directory to another."""
        if old_parent == new_parent:
            return
        artifacts, logical_bytes, first, last = self._db.execute(
            "SELECT artifacts, logical_bytes, first_write_ns, last_write_ns FROM nodes "
            "WHERE id = ?", (node_id,)).fetchone()
        self._aggregate_up(old_parent, -artifacts, -logical_bytes, (first, last), (None, None))
        self._aggregate_up(new_parent, artifacts, logical_bytes, (None, None), (first, last))

    def _delete_versions(self, version_ids: list[int]) -> None:
        """Remove versions (gc): the live artifacts whose oldest or newest version goes get
        their times re-read (a current version is never removed, so sizes do not change)."""
        marks = _marks(version_ids)
        touched = [row[0] for row in self._db.execute(
            f"SELECT DISTINCT n.id FROM versions v JOIN nodes n ON n.id = v.node_id "
            f"WHERE v.id IN ({marks}) "
            "AND (v.created_ns = n.first_write_ns OR v.created_ns = n.last_write_ns)",
            version_ids)]
        self._db.execute(f"DELETE FROM versions WHERE id IN ({marks})", version_ids)
        for node_id in touched:
            self._aggregate_file(node_id)

    def aggregate_drift(self, limit: int = 20) -> tuple[int, list[str]]:
        """Nodes whose aggregate columns differ from a recomputation from their versions
        (files) or children (directories): (how many, the first `limit` described)."""
        rows = self._db.execute(
            """
            WITH fresh AS (
                SELECT n.id, (n.version_id IS NOT NULL) AS a, coalesce(cv.size, 0) AS b,
                       (SELECT min(created_ns) FROM versions v WHERE v.node_id = n.id) AS f,
                       (SELECT max(created_ns) FROM versions v WHERE v.node_id = n.id) AS l
                FROM nodes n LEFT JOIN versions cv ON cv.id = n.version_id
                WHERE n.kind = 'file'
                UNION ALL
                SELECT d.id, coalesce(sum(c.artifacts), 0), coalesce(sum(c.logical_bytes), 0),
                       min(c.first_write_ns), max(c.last_write_ns)
                FROM nodes d LEFT JOIN nodes c ON c.parent_id = d.id
                WHERE d.kind != 'file' GROUP BY d.id
            )
            SELECT n.id, n.artifacts, n.logical_bytes, n.first_write_ns, n.last_write_ns,
                   fresh.a, fresh.b, fresh.f, fresh.l
            FROM fresh JOIN nodes n ON n.id = fresh.id
            WHERE (n.artifacts, n.logical_bytes) != (fresh.a, fresh.b)
               OR n.first_write_ns IS NOT fresh.f OR n.last_write_ns IS NOT fresh.l
            ORDER BY n.id
            """
        ).fetchall()
        return len(rows), [
            f"{self.path_of(row[0])}: aggregates (artifacts, logical_bytes, first_write_ns, "
            f"last_write_ns) are {tuple(row[1:5])}, recomputed {tuple(row[5:9])}"
            for row in rows[:limit]]

    def recompute_aggregates(self) -> None:
        """fsck --repair: every node's aggregate columns from scratch, in one transaction."""
        with self._transaction() as db:
            schema.recompute_aggregates(db)

    # -- sealing --------------------------------------------------------------------------

    def seal(self, execution_id: int, root: str, now_ns: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE nodes SET sealed_ns = ?, root_sha256 = ?, ctime_ns = ? "
                "WHERE id = ? AND kind = 'execution'",
                (now_ns, root, now_ns, execution_id),
            )

    def unseal(self, execution_id: int, now_ns: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE nodes SET sealed_ns = NULL, root_sha256 = NULL, ctime_ns = ? "
                "WHERE id = ? AND kind = 'execution'",
                (now_ns, execution_id),
            )

    def readable_by(self, top: int, uid: int, gid: int) -> bool:
        """Whether the modes let a user list and read everything at and below a directory:
        read on every file, read and search on every directory. Only the primary group is
        known, so where it is not a node's group both its group and other bits must allow
        (the user may be in that group, whose bits then apply)."""
        row = self._db.execute(
            f"""{_SUBTREE},
            checked AS (
                SELECT mode, uid, gid, CASE kind WHEN 'file' THEN 4 ELSE 5 END AS need
                FROM nodes WHERE id = :top OR id IN (SELECT id FROM sub)
            )
            SELECT 1 FROM checked WHERE NOT CASE
                WHEN uid = :uid THEN (mode >> 6) & need = need
                WHEN gid = :gid THEN (mode >> 3) & need = need
                ELSE mode & need = need AND (mode >> 3) & need = need END
            LIMIT 1
            """,
            {"top": top, "uid": uid, "gid": gid},
        ).fetchone()
        return row is None

    def root_of(self, execution_id: int) -> str | None:
        row = self._db.execute(
            "SELECT root_sha256 FROM nodes WHERE id = ?", (execution_id,)
        ).fetchone()
        return row[0] if row else None

    # -- garbage collection ---------------------------------------------------------------

    def superseded_versions(self) -> list[tuple[int, int | None, str]]:
        """(version id, live node id or None, path) of every version that is not current,
        newest first."""
        rows = self._db.execute(
            "SELECT v.id, n.id, v.path FROM versions v LEFT JOIN nodes n ON n.id = v.node_id "
            "WHERE v.replaced_ns IS NOT NULL ORDER BY v.id DESC"
        )
        return [(row[0], row[1], row[2]) for row in rows]

    def collect(self, version_ids: list[int], *, keep_blobs: set[str], dry_run: bool) -> GcPlan:
        """Remove versions, then every blob row nothing references any more: one transaction.
        Blobs in `keep_blobs` (writes in flight are about to use them) are left alone."""
        with self._transaction(commit=not dry_run) as db:
            for chunk in _chunks(version_ids):
                self._delete_versions(chunk)
            rows = db.execute(
                f"SELECT {_BLOB_COLUMNS} FROM blobs b WHERE refcount = 0 AND NOT EXISTS "
                "(SELECT 1 FROM versions v WHERE v.blob_id = b.id) ORDER BY id"
            ).fetchall()
            freed = [blob for blob in map(_blob, rows) if blob.digest not in keep_blobs]
            for chunk in _chunks([blob.blob_id for blob in freed]):
                db.execute(f"DELETE FROM blobs WHERE id IN ({_marks(chunk)})", chunk)
        return GcPlan(len(version_ids), freed)

    def known_digests(self, digests: list[str]) -> set[str]:
        known: set[str] = set()
        for chunk in _chunks(digests):
            known |= {row[0] for row in self._db.execute(
                f"SELECT sha256 FROM blobs WHERE sha256 IN ({_marks(chunk)})",
                chunk)}
        return known

    # -- repair ---------------------------------------------------------------------------

    def repair(self, plan: RepairPlan, now_ns: int) -> int:
        """Apply what fsck --repair decided, in one transaction. Returns refcounts fixed."""
        fixed = 0
        with self._transaction() as db:
            for chunk in _chunks(plan.damaged):
                db.execute(
                    f"UPDATE blobs SET damaged_ns = ? WHERE id IN ({_marks(chunk)}) "
                    "AND damaged_ns IS NULL",
                    (now_ns, *chunk),
                )
            for chunk in _chunks(plan.sound):
                db.execute(
                    f"UPDATE blobs SET damaged_ns = NULL WHERE id IN ({_marks(chunk)})",
                    chunk,
                )
            if plan.drift:
                before = db.total_changes
                db.execute(
                    f"""
                    WITH {_LIVE_REFS}
                    UPDATE blobs SET refcount = coalesce(
                        (SELECT n FROM live WHERE live.blob_id = blobs.id), 0)
                    WHERE refcount !=
                        coalesce((SELECT n FROM live WHERE live.blob_id = blobs.id), 0)
                    """
                )
                fixed = db.total_changes - before
            if plan.remove_unpublished:
                db.execute(_DELETE_UNPUBLISHED)
        return fixed

    def blob_ids_damaged(self) -> set[int]:
        return {row[0] for row in self._db.execute(
            "SELECT id FROM blobs WHERE damaged_ns IS NOT NULL")}

    # -- import ---------------------------------------------------------------------------

    def add_tree(self, name: str, top: TreeEntry, entries: list[TreeEntry],
                 blobs: dict[str, StoredBlob], sealed: tuple[int, str] | None,
                 now_ns: int) -> int:
        """Create runs/<name> with everything below it, histories and tags: one transaction.
        `blobs` holds every digest the versions use (already in the blob store)."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM nodes WHERE parent_id = ? AND name = ?",
                          (RUNS_INODE, name)).fetchone():
                raise AlreadyExists(f"runs/{name} already exists")
            blob_ids = {digest: self._upsert_blob(stored, now_ns, references=0)
                        for digest, stored in blobs.items()}
            ids = {"": self._insert_node(RUNS_INODE, name, Kind.EXECUTION, top)}
            if sealed is not None:
                db.execute("UPDATE nodes SET sealed_ns = ?, root_sha256 = ? WHERE id = ?",
                           (*sealed, ids[""]))
            self._set_tags(ids[""], top.tags)
            for entry in sorted(entries, key=lambda e: e.rel.count("/")):
                parent_rel, _, leaf = entry.rel.rpartition("/")
                node_id = self._insert_node(ids[parent_rel], leaf, entry.kind, entry)
                ids[entry.rel] = node_id
                self._set_tags(node_id, entry.tags)
                if entry.kind is Kind.FILE:
                    self._insert_history(node_id, f"runs/{name}/{entry.rel}", entry, blob_ids)
            schema.recompute_aggregates(db, ids[""])
        return ids[""]

    def _upsert_blob(self, stored: StoredBlob, now_ns: int, *, references: int) -> int:
        """The blob's row, made if new; it gains `references` live artifacts. Returns its id."""
        self._db.execute(
            "INSERT INTO blobs (sha256, size, stored_size, encoding, refcount, created_ns) "
            "VALUES (?, ?, ?, ?, ?, ?) "
            # If its file had to be written again (it was missing), the new file's size and
            # encoding are what is on disk now.
            "ON CONFLICT (sha256) DO UPDATE SET refcount = refcount + excluded.refcount, "
            "stored_size = excluded.stored_size, encoding = excluded.encoding, "
            # A damaged blob whose file was just written again is sound again.
            "damaged_ns = CASE WHEN ? THEN NULL ELSE damaged_ns END",
            (stored.digest, stored.size, stored.stored_size, stored.encoding, references,
             now_ns, stored.fresh),
        )
        return self._db.execute(
            "SELECT id FROM blobs WHERE sha256 = ?", (stored.digest,)
        ).fetchone()[0]

    def _insert_node(self, parent_id: int, name: str, kind: Kind, entry: TreeEntry) -> int:
        node_id = self._db.execute(
            "INSERT INTO nodes (parent_id, name, kind, mode, uid, gid, mtime_ns, ctime_ns, "
            "nlink) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (parent_id, name, kind.value, entry.mode, entry.uid, entry.gid, entry.mtime_ns,
             entry.ctime_ns, 2 if kind.is_dir else 1),
        ).lastrowid or 0
        if kind.is_dir:
            self._adjust_nlink(parent_id, +1)
        return node_id

    def _set_tags(self, node_id: int, tags: dict[str, bytes]) -> None:
        self._db.executemany(
            "INSERT INTO tags (node_id, name, value) VALUES (?, ?, ?)",
            [(node_id, name, value) for name, value in tags.items()],
        )

    def _insert_history(self, node_id: int, path: str, entry: TreeEntry,
                        blob_ids: dict[str, int]) -> None:
        version_id = None
        for version in entry.versions:
            version_id = self._db.execute(
                "INSERT INTO versions (node_id, path, blob_id, size, mode, uid, gid, mtime_ns, "
                "ctime_ns, content_type, created_ns, replaced_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (node_id, version.path or path, blob_ids[version.digest], version.size,
                 version.mode, version.uid, version.gid, version.mtime_ns, version.ctime_ns,
                 version.content_type, version.created_ns, version.replaced_ns),
            ).lastrowid
        current = entry.versions[-1]
        self._db.execute("UPDATE nodes SET version_id = ? WHERE id = ?", (version_id, node_id))
        self._db.execute("UPDATE blobs SET refcount = refcount + 1 WHERE id = ?",
                         (blob_ids[current.digest],))
