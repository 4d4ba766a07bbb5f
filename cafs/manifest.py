"""The manifest: all SQL of cafs.

Owns: `manifest.sqlite` — the namespace under runs/ (nodes), the versions of every artifact,
the blobs' records and refcounts, and tags. Raw sqlite3 on the hot paths; sqlite-utils for
schema, migrations and admin. Must not touch blob files, FUSE or trio.

Concurrency rule: one connection, used from one thread. Every method that changes anything is one
transaction (`with self._transaction():`) and never yields to an event loop in between, so the
changes of one filesystem operation are atomic without locks.

Durability: WAL with synchronous=NORMAL — a commit survives a crash of the process; `sync()`
fsyncs the WAL so that everything committed so far also survives power loss.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlite_utils import Database

from cafs import schema
from cafs.digest import Digest
from cafs.errors import Corrupt, StoreError
from cafs.model import RUNS_INODE, BlobRef, Kind, Node, StoredBlob

_NODE_COLUMNS = """
    n.id, n.parent_id, n.name, n.kind, n.mode, n.uid, n.gid, n.mtime_ns, n.ctime_ns, n.nlink,
    n.version_id, b.id, b.sha256, b.size, b.stored_size, b.encoding
"""
_NODE_FROM = """
    FROM nodes n LEFT JOIN versions v ON v.id = n.version_id LEFT JOIN blobs b ON b.id = v.blob_id
"""
_BLOB_COLUMNS = "id, sha256, size, stored_size, encoding"


def _node(row: tuple) -> Node:
    blob = BlobRef(row[11], Digest(row[12]), row[13], row[14], row[15]) if row[11] else None
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
    )


def _blob(row: tuple) -> BlobRef:
    return BlobRef(row[0], Digest(row[1]), row[2], row[3], row[4])


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


class Manifest:
    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
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
                self._db.execute("PRAGMA foreign_keys = ON")
                schema.migrate(Database(self._db))
            # Fail now, with a clear message, if the file is not a manifest at all.
            self._db.execute("SELECT count(*) FROM nodes WHERE id = 0").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: not a usable cafs manifest ({exc})") from exc

    def close(self) -> None:
        self._db.close()

    def admin(self) -> Database:
        """A sqlite-utils view of the same connection, for admin commands."""
        return Database(self._db)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def sync(self) -> None:
        """Make every committed transaction durable against power loss."""
        for suffix in ("-wal", ""):
            try:
                fd = os.open(f"{self.path}{suffix}", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

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
            self._touch(node.parent, now_ns)
            if new_parent != node.parent:
                self._touch(new_parent, now_ns)

    def remove_unpublished(self) -> int:
        """Drop files whose first write never completed (start-up after a crash)."""
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM nodes WHERE kind = 'file' AND version_id IS NULL")
        return cursor.rowcount

    def _drop_node(self, node: Node, now_ns: int) -> None:
        db = self._db
        if node.version_id is not None:
            db.execute(
                "UPDATE versions SET replaced_ns = ? WHERE id = ?", (now_ns, node.version_id)
            )
            db.execute(
                "UPDATE blobs SET refcount = refcount - 1 WHERE id = "
                "(SELECT blob_id FROM versions WHERE id = ?)",
                (node.version_id,),
            )
        db.execute("DELETE FROM tags WHERE node_id = ?", (node.ino,))
        db.execute("DELETE FROM nodes WHERE id = ?", (node.ino,))
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
        path = self.path_of(new.node_id)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO blobs (sha256, size, stored_size, encoding, refcount, created_ns) "
                "VALUES (?, ?, ?, ?, 1, ?) "
                # A known blob gains a reference; if its file had to be written again (it was
                # missing), the new file's size and encoding are what is on disk now.
                "ON CONFLICT (sha256) DO UPDATE SET refcount = refcount + 1, "
                "stored_size = excluded.stored_size, encoding = excluded.encoding",
                (stored.digest, stored.size, stored.stored_size, stored.encoding, new.now_ns),
            )
            blob_id = db.execute(
                "SELECT id FROM blobs WHERE sha256 = ?", (stored.digest,)
            ).fetchone()[0]
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
        node = self.node(new.node_id)
        assert node is not None
        return node

    # -- tags -----------------------------------------------------------------------------

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
            """
            SELECT b.sha256, b.refcount, coalesce(live.n, 0) FROM blobs b
            LEFT JOIN (
                SELECT v.blob_id, count(*) AS n FROM nodes n
                JOIN versions v ON v.id = n.version_id WHERE n.kind = 'file' GROUP BY v.blob_id
            ) live ON live.blob_id = b.id
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
