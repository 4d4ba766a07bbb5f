"""The aggregate columns of every node (schema m004), kept inside each change's transaction.

Owns: carrying a change of one node (a publish, an unlink, a move, gc of history) up the chain
of its ancestors to runs/, so that a directory's record costs a few indexed reads whatever it
holds. Every method runs inside a transaction its caller opened. Must not open a transaction,
decide what changes, or know why.

Why two paths up: when a child's times only widen, every ancestor's min/max can only widen
too, and one statement updates the whole chain; a minimum cannot be undone by a subtraction,
so when times shrink each ancestor's are re-read from its children (one index seek each).
"""

from __future__ import annotations

from cafs.manifest_api import DirStats
from cafs.model import RUNS_INODE
from cafs.sqlite_manifest.columns import AGGREGATES, DIR_STATS, marks
from cafs.sqlite_manifest.core import SqliteCore

_AGGREGATES = ", ".join(AGGREGATES)
_NONE = DirStats(0, 0, None, None)


class Aggregates(SqliteCore):
    """Aggregate upkeep shared by the parts that change nodes or versions."""

    def _aggregates_of(self, node_id: int) -> tuple[int, DirStats] | None:
        """(parent id, the node's aggregate columns), or None if there is no such node."""
        row = self._db.execute(
            f"SELECT parent_id, {_AGGREGATES} FROM nodes WHERE id = ?", (node_id,)).fetchone()
        return None if row is None else (row[0], DIR_STATS.decode(row[1:]))

    def _aggregate_file(self, node_id: int) -> None:
        """Re-read a file's aggregate columns from its versions and carry the change up."""
        found = self._aggregates_of(node_id)
        if found is None:
            return
        parent, before = found
        after = DIR_STATS.decode(self._db.execute(
            f"""
            UPDATE nodes SET
                artifacts = CASE WHEN version_id IS NULL THEN 0 ELSE 1 END,
                logical_bytes = coalesce(
                    (SELECT size FROM versions v WHERE v.id = nodes.version_id), 0),
                first_write_ns = (SELECT min(created_ns) FROM versions v WHERE v.node_id = ?1),
                last_write_ns = (SELECT max(created_ns) FROM versions v WHERE v.node_id = ?1)
            WHERE id = ?1 RETURNING {_AGGREGATES}
            """,
            (node_id,),
        ).fetchall()[0])
        self._aggregate_up(parent, before, after)

    def _aggregate_up(self, dir_id: int, old: DirStats, new: DirStats) -> None:
        """A child of `dir_id` changed from `old` to `new` (either may be "nothing": a child
        added or removed): update `dir_id` and every ancestor up to runs/."""
        artifacts = new.artifacts - old.artifacts
        logical_bytes = new.logical_bytes - old.logical_bytes
        old_first, old_last = old.first_write_ns, old.last_write_ns
        new_first, new_last = new.first_write_ns, new.last_write_ns
        if ((old_first is None or (new_first is not None and new_first <= old_first))
                and (old_last is None or (new_last is not None and new_last >= old_last))):
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

    def _aggregate_added(self, dir_id: int, child: DirStats) -> None:
        self._aggregate_up(dir_id, _NONE, child)

    def _aggregate_removed(self, dir_id: int, child: DirStats) -> None:
        self._aggregate_up(dir_id, child, _NONE)

    def _aggregate_moved(self, node_id: int, old_parent: int, new_parent: int) -> None:
        """A node (and its subtree) moved from one directory to another."""
        if old_parent == new_parent:
            return
        found = self._aggregates_of(node_id)
        if found is None:
            return
        self._aggregate_removed(old_parent, found[1])
        self._aggregate_added(new_parent, found[1])

    def _delete_versions(self, version_ids: list[int]) -> None:
        """Remove versions (gc): the live artifacts whose oldest or newest version goes get
        their times re-read (a current version is never removed, so sizes do not change)."""
        placeholders = marks(version_ids)
        touched = [row[0] for row in self._db.execute(
            f"SELECT DISTINCT n.id FROM versions v JOIN nodes n ON n.id = v.node_id "
            f"WHERE v.id IN ({placeholders}) "
            "AND (v.created_ns = n.first_write_ns OR v.created_ns = n.last_write_ns)",
            version_ids)]
        self._db.execute(f"DELETE FROM versions WHERE id IN ({placeholders})", version_ids)
        for node_id in touched:
            self._aggregate_file(node_id)
