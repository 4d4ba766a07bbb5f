"""The tags part of the SQLite manifest: user xattrs on artifacts and directories.

Owns: reading, setting, removing and querying tags, each change one transaction that also
bumps the node's ctime. Must not decide which names are tags or how large they may be (the vfs
core and cafs.rules do).
"""

from __future__ import annotations

from collections.abc import Iterator

from cafs.sqlite_manifest.rows import Rows


class SqliteTags(Rows):
    def tag(self, node_id: int, name: str) -> bytes | None:
        row = self._db.execute(
            "SELECT value FROM tags WHERE node_id = ? AND name = ?", (node_id, name)).fetchone()
        return bytes(row[0]) if row else None

    def tag_names(self, node_id: int) -> list[str]:
        rows = self._db.execute(
            "SELECT name FROM tags WHERE node_id = ? ORDER BY name", (node_id,)).fetchall()
        return [row[0] for row in rows]

    def tag_usage(self, node_id: int, *, excluding: str) -> tuple[int, int]:
        """Bytes of a node's tag names (each with its NUL, as listxattr returns them) and
        values, leaving out the tag `excluding` (about to be replaced)."""
        row = self._db.execute(
            "SELECT coalesce(sum(length(CAST(name AS BLOB)) + 1), 0), "
            "coalesce(sum(length(value)), 0) FROM tags WHERE node_id = ? AND name != ?",
            (node_id, excluding),
        ).fetchone()
        return row[0], row[1]

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
                "SELECT node_id FROM tags WHERE name = ? AND value = ?", (name, value))
        return {row[0] for row in rows}

    def set_tag(self, node_id: int, name: str, value: bytes, now_ns: int) -> None:
        with self._transaction() as db:
            self._insert_tags(node_id, {name: value}, replace=True)
            db.execute("UPDATE nodes SET ctime_ns = ? WHERE id = ?", (now_ns, node_id))

    def remove_tag(self, node_id: int, name: str, now_ns: int) -> bool:
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM tags WHERE node_id = ? AND name = ?", (node_id, name))
            db.execute("UPDATE nodes SET ctime_ns = ? WHERE id = ?", (now_ns, node_id))
        return cursor.rowcount > 0
