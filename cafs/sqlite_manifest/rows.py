"""Row-level reads and writes every part of the SQLite manifest shares.

Owns: reading a node (by id, by name in a directory) and its path; the writes several
operations make the same way — a new node, a new version, a blob's row and its references, a
current version retired, a path history joined, parked or merged (schema m007) — each written
once here from the statements in columns.py. Writes
run inside a transaction the caller opened. Must not open a transaction itself, or decide
whether a change is allowed (the vfs core does).
"""

from __future__ import annotations

from cafs.model import BlobRef, Kind, Node, StoredBlob
from cafs.sqlite_manifest.aggregates import Aggregates
from cafs.sqlite_manifest.columns import (
    HELD,
    INSERT_NODE,
    INSERT_TAG,
    NODE_FROM,
    NODE_SELECT,
    UPSERT_BLOB,
    decode_node,
    node_values,
)

# Built once: node() runs at every open of a file on a shared manifest (close-to-open), and
# PostgreSQL's connection looks each text up in its caches (a new string is hashed anew).
_NODE_BY_ID = f"SELECT {NODE_SELECT} {NODE_FROM} WHERE n.id = ?"
_NODE_BY_NAME = f"SELECT {NODE_SELECT} {NODE_FROM} WHERE n.parent_id = ? AND n.name = ?"


class Rows(Aggregates):
    """Shared node reads and the statements every change is built from."""

    def node(self, node_id: int) -> Node | None:
        row = self._db.execute(_NODE_BY_ID, (node_id,)).fetchone()
        return decode_node(row) if row else None

    def child(self, parent_id: int, name: str) -> Node | None:
        row = self._db.execute(_NODE_BY_NAME, (parent_id, name)).fetchone()
        return decode_node(row) if row else None

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

    # -- writes, inside the caller's transaction -------------------------------------------

    def _insert_node(self, parent_id: int, name: str, kind: Kind, *, mode: int, uid: int,
                     gid: int, mtime_ns: int, ctime_ns: int) -> int:
        """A new directory or (unpublished) file; a directory adds a link to its parent."""
        node_id = self._db.execute(INSERT_NODE, node_values(
            parent_id, name, kind, mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns,
            ctime_ns=ctime_ns)).lastrowid or 0
        self._new_node_id(node_id)
        if kind.is_dir:
            self._adjust_nlink(parent_id, +1)
        return node_id

    def _upsert_blob(self, stored: StoredBlob, now_ns: int, *, references: int) -> int:
        """The blob's row, made if new; it gains `references` live artifacts. Returns its id."""
        return self._upsert_blob_ref(stored, now_ns, references=references).blob_id

    def _upsert_blob_ref(self, stored: StoredBlob, now_ns: int, *, references: int) -> BlobRef:
        """_upsert_blob, returning the row as it now is. RETURNING gives it whether the row
        was made or updated: one round trip where the manifest is on a server."""
        blob_id, damaged_ns = self._db.execute(UPSERT_BLOB + " RETURNING id, damaged_ns", {
            "sha256": stored.digest, "size": stored.size, "stored_size": stored.stored_size,
            "encoding": stored.encoding, "refcount": references, "created_ns": now_ns,
            "fresh": stored.fresh,
        }).fetchone()
        return BlobRef(int(blob_id), stored.digest, stored.size, stored.stored_size,
                       stored.encoding, damaged_ns is not None)

    def _retire_current(self, node_id: int, now_ns: int) -> None:
        """The node's current version (if any) becomes history: marked replaced, and its blob
        loses the reference. Read from the row, never from a caller's copy of the node: a copy
        can be stale, and a reference must never be left behind nor dropped twice."""
        current = "(SELECT version_id FROM nodes WHERE id = ?)"
        self._db.execute(f"UPDATE versions SET replaced_ns = ? WHERE id = {current}",
                         (now_ns, node_id))
        self._db.execute("UPDATE blobs SET refcount = refcount - 1 WHERE id = "
                         f"(SELECT blob_id FROM versions WHERE id = {current})", (node_id,))

    # -- path histories (schema m007) ------------------------------------------------------
    # A history no node holds is parked at its home: histories.path if set, else the path of
    # its newest version. Removing a file therefore writes nothing in the common case (rm -rf
    # on a full disk must only free space); the home is written where it differs from that
    # version's path: at a file's rename, and at a removal after its directory moved.

    def _history_of(self, node_id: int) -> int | None:
        row = self._db.execute("SELECT history_id FROM nodes WHERE id = ?", (node_id,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def _parked_at(self, path: str) -> int | None:
        """The history no live artifact holds whose home is `path`, if any."""
        row = self._db.execute(
            f"""
            SELECT h.id FROM histories h WHERE h.path = :path AND NOT {HELD}
            UNION ALL
            SELECT h.id FROM versions v JOIN histories h ON h.id = v.history_id
            WHERE v.path = :path AND v.number = h.last_number AND h.path IS NULL
              AND NOT {HELD}
            LIMIT 1
            """,
            {"path": path},
        ).fetchone()
        return None if row is None else int(row[0])

    def _home_of(self, history_id: int) -> str | None:
        row = self._db.execute(
            "SELECT coalesce(h.path, (SELECT v.path FROM versions v WHERE v.history_id = h.id "
            "AND v.number = h.last_number)) FROM histories h WHERE h.id = ?",
            (history_id,)).fetchone()
        return None if row is None else row[0]

    def _history_to_publish(self, node_id: int, path: str) -> int:
        """The history a new version of this artifact, published at `path`, joins: its own;
        else the one parked at its path (rm then re-create, a file written where one was
        replaced); else a new one. The new version is its newest, so `path` is its home."""
        db = self._db
        history = self._history_of(node_id)
        if history is None:
            history = self._parked_at(path)
            if history is None:
                history = int(db.execute("INSERT INTO histories DEFAULT VALUES").lastrowid or 0)
            db.execute("UPDATE nodes SET history_id = ? WHERE id = ?", (history, node_id))
        db.execute("UPDATE histories SET path = NULL WHERE id = ? AND path IS NOT NULL",
                   (history,))
        return history

    def _next_number(self, history_id: int) -> int:
        return int(self._db.execute(
            "UPDATE histories SET last_number = last_number + 1 WHERE id = ? "
            "RETURNING last_number", (history_id,)).fetchone()[0])

    def _park_history(self, node_id: int) -> None:
        """Before a file leaves the namespace (unlink, replaced by a rename): its history
        stays at its path for the next file there. One parked there already (a directory was
        moved onto the path of a removed one) joins it."""
        history = self._history_of(node_id)
        if history is None:
            return
        path = self.path_of(node_id)
        older = self._parked_at(path)
        if older is not None:
            self._merge_history(older, into=history)
        self._set_home(history, path)

    def _arrive(self, node_id: int, path: str) -> None:
        """A file was moved to `path`. If a history is parked there (the replaced file's, or
        a removed one's), the moved file's versions join it, numbered after its newest, and
        the file continues it; a file never published adopts it at its first publish."""
        history = self._history_of(node_id)
        if history is None:
            return
        parked = self._parked_at(path)
        if parked is not None:
            self._merge_history(history, into=parked)
            history = parked
        self._set_home(history, path)

    def _set_home(self, history_id: int, path: str) -> None:
        if self._home_of(history_id) != path:
            self._db.execute("UPDATE histories SET path = ? WHERE id = ?", (path, history_id))

    def _merge_history(self, source: int, into: int) -> None:
        """Move every version of `source` to the end of `into`, in their order; whoever held
        `source` now holds `into`. The numbers `into` gave stay as they were."""
        db = self._db
        base = db.execute("SELECT last_number FROM histories WHERE id = ?", (into,)).fetchone()[0]
        moved = db.execute(
            "UPDATE versions SET history_id = :into, number = :base + r.rank FROM (SELECT id, "
            "row_number() OVER (ORDER BY number) AS rank FROM versions "
            "WHERE history_id = :source) r WHERE versions.id = r.id",
            {"into": into, "base": base, "source": source}).rowcount
        db.execute("UPDATE histories SET last_number = last_number + ? WHERE id = ?",
                   (moved, into))
        db.execute("DELETE FROM histories WHERE id = ?", (source,))
        db.execute("UPDATE nodes SET history_id = ? WHERE history_id = ?", (into, source))

    def _insert_tags(self, node_id: int, tags: dict[str, bytes], *,
                     replace: bool = False) -> None:
        """Tags on a node; `replace` overwrites a tag of the same name (setxattr)."""
        self._db.executemany(
            INSERT_TAG + (" ON CONFLICT (node_id, name) DO UPDATE SET value = excluded.value"
                          if replace else ""),
            [{"node_id": node_id, "name": name, "value": value} for name, value in tags.items()],
        )

    def _adjust_nlink(self, node_id: int, delta: int) -> None:
        self._db.execute("UPDATE nodes SET nlink = nlink + ? WHERE id = ?", (delta, node_id))

    def _touch(self, node_id: int, now_ns: int) -> None:
        """A directory's entries changed: bump its mtime and ctime."""
        self._db.execute(
            "UPDATE nodes SET mtime_ns = ?, ctime_ns = ? WHERE id = ?", (now_ns, now_ns, node_id))
