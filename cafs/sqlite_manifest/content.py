"""The content part of the SQLite manifest: blobs, versions and the references between them.

Owns: reading blob rows and the versions of artifacts, which artifacts hold which content, and
publish — a new version of an artifact in one transaction that moves the references from the
old content to the new and keeps the aggregates. Must not read or write blob files (the blob
store does, before publish is called).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from cafs import crashpoints
from cafs.digest import Digest
from cafs.errors import NotFound
from cafs.manifest_api import DirStats, NewVersion
from cafs.model import SYMLINK_MODE, BlobRef, Kind, Node, StoredBlob, Version
from cafs.sqlite_manifest.columns import (
    AGGREGATES,
    BLOB,
    DIR_STATS,
    INSERT_VERSION,
    NODE,
    VERSION,
    chunks,
    marks,
    version_values,
)
from cafs.sqlite_manifest.rows import Rows

_AGGREGATES_OF_N = ", ".join(f"n.{column}" for column in AGGREGATES)
# A node's aggregates read after its NODE columns and its history id.
DIR_STATS_AFTER_NODE = DIR_STATS.at(NODE.width + 1)
# ...and after them, when the node's current version was published.
_CURRENT_CREATED_NS = "(SELECT v.created_ns FROM versions v WHERE v.id = n.version_id)"
_CURRENT_CREATED_AT = NODE.width + 1 + len(AGGREGATES)


class SqliteContent(Rows):
    # -- blobs ----------------------------------------------------------------------------

    def blob(self, digest: Digest) -> BlobRef | None:
        row = self._db.execute(
            f"SELECT {BLOB.select} FROM blobs b WHERE sha256 = ?", (digest,)).fetchone()
        return BLOB.decode(row) if row else None

    def blob_by_id(self, blob_id: int) -> BlobRef | None:
        row = self._db.execute(
            f"SELECT {BLOB.select} FROM blobs b WHERE id = ?", (blob_id,)).fetchone()
        return BLOB.decode(row) if row else None

    def blobs_page(self, after_id: int, limit: int) -> list[BlobRef]:
        rows = self._db.execute(
            f"SELECT {BLOB.select} FROM blobs b WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [BLOB.decode(row) for row in rows]

    def newest_blobs(self, limit: int) -> list[BlobRef]:
        rows = self._db.execute(
            f"SELECT {BLOB.select} FROM blobs b ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [BLOB.decode(row) for row in rows]

    def all_blobs(self) -> Iterator[BlobRef]:
        for row in self._db.execute(f"SELECT {BLOB.select} FROM blobs b ORDER BY id"):
            yield BLOB.decode(row)

    def blob_created_ns(self, blob_id: int) -> int:
        row = self._db.execute("SELECT created_ns FROM blobs WHERE id = ?", (blob_id,)).fetchone()
        return row[0] if row else 0

    def blob_ids_damaged(self) -> set[int]:
        return {row[0] for row in self._db.execute(
            "SELECT id FROM blobs WHERE damaged_ns IS NOT NULL")}

    def known_digests(self, digests: list[str]) -> set[str]:
        known: set[str] = set()
        for chunk in chunks(digests):
            known |= {row[0] for row in self._db.execute(
                f"SELECT sha256 FROM blobs WHERE sha256 IN ({marks(chunk)})", chunk)}
        return known

    def refcount(self, blob_id: int) -> int:
        row = self._db.execute("SELECT refcount FROM blobs WHERE id = ?", (blob_id,)).fetchone()
        return row[0] if row else 0

    # -- versions -------------------------------------------------------------------------

    def publish(self, stored: StoredBlob, new: NewVersion) -> Node:
        """Record a new version of an artifact, in one transaction.

        `stored` is either a blob just written, or (dedup) one the manifest already has.
        The artifact's previous version, if any, is marked replaced and its blob loses a
        reference; the new blob gains one.
        """
        published: Node | None = None
        with self._transaction() as db:
            self._lock_rows([new.node_id], stored.digest)
            row = db.execute(f"SELECT {NODE.select}, n.history_id, {_AGGREGATES_OF_N}, "
                             f"{_CURRENT_CREATED_NS} FROM nodes n WHERE n.id = ?",
                             (new.node_id,)).fetchone()
            if row is None:  # removed on another host while this one wrote it
                raise NotFound(f"node {new.node_id} was removed while being published")
            node = NODE.decode(row, None)
            current_created_ns = row[_CURRENT_CREATED_AT]
            if current_created_ns is not None and new.now_ns <= current_created_ns:
                # The time was taken before this publish waited for the node's lock, and
                # another publish (on another host, or with a clock ahead) committed in
                # between: a version is never older than the one it replaces, so the
                # newest version in history is the current one.
                new = replace(new, now_ns=current_created_ns + 1)
            if new.collapses is not None and node.version_id != new.collapses:
                # Another writer (on another host) published after this open's earlier
                # version: that one stays in history, in its place, and this one follows.
                new = replace(new, collapses=None)
            if node.version_id is None and row[NODE.width] is None and new.collapses is None:
                version_id, blob = self._record_first_version(
                    stored, new, node.parent, DIR_STATS_AFTER_NODE.decode(row))
                # The row as it now is, without reading it back (a query per publish).
                published = replace(node, version_id=version_id, blob=blob,
                                    mtime_ns=new.mtime_ns, ctime_ns=new.ctime_ns)
            else:
                self._record_version(stored, new)
            self._version_recorded(new)
            crashpoints.reached("before-manifest-commit")
        crashpoints.reached("after-manifest-commit")
        if published is None:
            published = self.node(new.node_id)
            assert published is not None
        return published

    def _version_recorded(self, new: NewVersion) -> None:
        """Inside a publish's transaction, after its rows: nothing more on one host."""

    def add_symlink(self, parent_id: int, name: str, stored: StoredBlob, *, uid: int, gid: int,
                    now_ns: int) -> Node:
        """A new symlink whose target is the blob `stored`, with its first version: one
        transaction, so a symlink is never seen without its target."""
        with self._transaction():
            node_id = self._insert_node(parent_id, name, Kind.SYMLINK, mode=SYMLINK_MODE,
                                        uid=uid, gid=gid, mtime_ns=now_ns, ctime_ns=now_ns)
            self._touch(parent_id, now_ns)
            self._record_version(stored, NewVersion(
                node_id=node_id, mode=SYMLINK_MODE, uid=uid, gid=gid, mtime_ns=now_ns,
                ctime_ns=now_ns, content_type=None, now_ns=now_ns))
        node = self.node(node_id)
        assert node is not None
        return node

    def _record_version(self, stored: StoredBlob, new: NewVersion) -> None:
        """Inside the caller's transaction: the version, numbered in its path's history, the
        references, the aggregates."""
        db = self._db
        path = self.path_of(new.node_id)
        blob_id = self._upsert_blob(stored, new.now_ns, references=1)
        self._retire_current(new.node_id, new.now_ns)
        history = self._history_to_publish(new.node_id, path)
        number = None
        if new.collapses is not None:
            # The same open-for-write published before (an fsync): this version takes its
            # place, and its number, so the numbers stay 1..n without a gap.
            row = db.execute("DELETE FROM versions WHERE id = ? AND node_id = ? AND "
                             "replaced_ns IS NOT NULL AND history_id = ? RETURNING number",
                             (new.collapses, new.node_id, history)).fetchone()
            number = row[0] if row is not None else None
        version_id = db.execute(INSERT_VERSION, version_values(
            node_id=new.node_id, path=path, blob_id=blob_id, size=stored.size,
            mode=new.mode, uid=new.uid, gid=new.gid, mtime_ns=new.mtime_ns,
            ctime_ns=new.ctime_ns, content_type=new.content_type, created_ns=new.now_ns,
            history_id=history,
            number=number if number is not None else self._next_number(history),
        )).lastrowid
        db.execute(
            "UPDATE nodes SET version_id = ?, mtime_ns = ?, ctime_ns = ? WHERE id = ?",
            (version_id, new.mtime_ns, new.ctime_ns, new.node_id),
        )
        self._aggregate_file(new.node_id)

    def _record_first_version(self, stored: StoredBlob, new: NewVersion, parent_id: int,
                              before: DirStats) -> tuple[int, BlobRef]:
        """_record_version for a file's first publish (the node holds no version and no
        history: a file just created), in half the statements (a small file's publish is
        most of its cost): nothing to retire, a new history numbered 1 unless one is parked
        at its path, and the node's aggregates set directly (this is its only version)."""
        db = self._db
        path = self.path_of(new.node_id)
        blob = self._upsert_blob_ref(stored, new.now_ns, references=1)
        blob_id = blob.blob_id
        history = self._parked_at(path)
        if history is None:
            history = int(db.execute("INSERT INTO histories (last_number) VALUES (1) "
                                     "RETURNING id").fetchone()[0])
            number = 1
        else:
            db.execute("UPDATE histories SET path = NULL WHERE id = ? AND path IS NOT NULL",
                       (history,))
            number = self._next_number(history)
        version_id = db.execute(INSERT_VERSION, version_values(
            node_id=new.node_id, path=path, blob_id=blob_id, size=stored.size,
            mode=new.mode, uid=new.uid, gid=new.gid, mtime_ns=new.mtime_ns,
            ctime_ns=new.ctime_ns, content_type=new.content_type, created_ns=new.now_ns,
            history_id=history, number=number,
        )).lastrowid
        assert version_id is not None
        self._point_at_first_version(new, version_id, history, stored.size, parent_id, before)
        return version_id, blob

    def _point_at_first_version(self, new: NewVersion, version_id: int, history: int,
                                size: int, parent_id: int, before: DirStats) -> None:
        """A new file's node names its first version and counts as one artifact; its
        directories' aggregates grow by it (both manifests' first publish ends so)."""
        after = DirStats(1, size, new.now_ns, new.now_ns)
        self._db.execute(
            "UPDATE nodes SET version_id = ?, history_id = ?, mtime_ns = ?, ctime_ns = ?, "
            "artifacts = ?, logical_bytes = ?, first_write_ns = ?, last_write_ns = ? "
            "WHERE id = ?",
            (version_id, history, new.mtime_ns, new.ctime_ns, after.artifacts,
             after.logical_bytes, after.first_write_ns, after.last_write_ns, new.node_id),
        )
        self._aggregate_up(parent_id, before, after)

    def history(self, node_id: int | None, path: str) -> list[Version]:
        """The versions of the artifact at `path`, by number: the history the node there
        continues, else (no artifact there, or one not yet published) the one parked at the
        path. Versions of files replaced there by a rename, or removed and written again,
        are in it (schema m007)."""
        history = self._history_of(node_id) if node_id is not None else None
        if history is None:
            history = self._parked_at(path)
        rows = self._db.execute(
            f"SELECT {VERSION.select} FROM versions v JOIN blobs b ON b.id = v.blob_id "
            "WHERE v.history_id = ? ORDER BY v.number", (history,)).fetchall()
        return [VERSION.decode(row) for row in rows]

    def version_number(self, version_id: int) -> int | None:
        """A version's number in its path's history."""
        row = self._db.execute("SELECT number FROM versions WHERE id = ?",
                               (version_id,)).fetchone()
        return None if row is None else row[0]

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
        for chunk in chunks(blob_ids):
            found += [row[0] for row in self._db.execute(
                f"SELECT n.id FROM versions v JOIN nodes n ON n.version_id = v.id "
                f"WHERE v.blob_id IN ({marks(chunk)})", chunk)]
        return found
