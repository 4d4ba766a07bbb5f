"""The maintenance part of the SQLite manifest: statistics, checks, repair and gc.

Owns: the totals and per-directory statistics, the checks fsck runs against the rows
(dangling references, refcount and aggregate drift, unpublished files), applying a repair plan,
and the gc transaction that drops history and the blob rows nothing references. Must not touch
blob files (callers delete the files of the blob rows gc returns) or decide what to repair.
"""

from __future__ import annotations

from collections.abc import Callable

from cafs import schema
from cafs.manifest_api import DirStats, GcPlan, RepairPlan, SharingStats, Totals
from cafs.model import RUNS_INODE, BlobRef
from cafs.sqlite_manifest.columns import (
    AGGREGATES,
    BLOB,
    DIR_STATS,
    GC_BATCH,
    LEAF_KINDS,
    LIVE_REFS,
    SUBTREE,
    chunks,
    marks,
)
from cafs.sqlite_manifest.rows import Rows


class SqliteMaintenance(Rows):
    # Another part's (SqliteNamespace): the parts make one object (see .manifest).
    remove_unpublished: Callable[[], int]

    # -- statistics -----------------------------------------------------------------------

    def totals(self) -> Totals:
        db = self._db
        artifacts, logical = db.execute(
            "SELECT count(*), coalesce(sum(v.size), 0) FROM nodes n "
            f"JOIN versions v ON v.id = n.version_id WHERE n.kind IN {LEAF_KINDS}"
        ).fetchone()
        blobs, unique, stored = db.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(stored_size), 0) FROM blobs"
        ).fetchone()
        versions = db.execute("SELECT count(*) FROM versions").fetchone()[0]
        executions = db.execute(
            "SELECT count(*) FROM nodes WHERE kind = 'execution'").fetchone()[0]
        layers = db.execute("SELECT count(*) FROM nodes WHERE kind = 'layer'").fetchone()[0]
        return Totals(artifacts, blobs, logical, unique, stored, versions, executions, layers)

    def dir_stats(self, top: int) -> DirStats:
        """Aggregates over the artifacts below a directory: its row's aggregate columns."""
        row = self._db.execute(
            f"SELECT {DIR_STATS.select} FROM nodes WHERE id = ?", (top,)).fetchone()
        return DIR_STATS.decode(row) if row else DirStats(0, 0, None, None)

    def sharing_stats(self, top: int) -> SharingStats:
        """Artifacts below a directory and the contents only they hold: one query over the
        whole subtree (no rows to Python), O(artifacts below it)."""
        row = self._db.execute(
            f"""{SUBTREE},
            cur AS (
                SELECT v.blob_id, v.size FROM sub JOIN nodes n ON n.id = sub.id
                JOIN versions v ON v.id = n.version_id WHERE n.kind IN {LEAF_KINDS}
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

    # -- checks ---------------------------------------------------------------------------

    def refcount_drift(self) -> list[tuple[str, int, int]]:
        """Blobs whose recorded refcount differs from the live artifacts using them."""
        rows = self._db.execute(
            f"""
            WITH {LIVE_REFS}
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
        return int(self._db.execute(
            "SELECT count(*) FROM nodes WHERE kind = 'file' AND version_id IS NULL"
        ).fetchone()[0])

    def aggregate_drift(self, limit: int = 20) -> tuple[int, list[str]]:
        """Nodes whose aggregate columns differ from a recomputation from their versions
        (files) or children (directories): (how many, the first `limit` described)."""
        stored = ", ".join(f"n.{column}" for column in AGGREGATES)
        rows = self._db.execute(
            f"""
            WITH fresh AS (
                SELECT n.id, (n.version_id IS NOT NULL) AS a, coalesce(cv.size, 0) AS b,
                       (SELECT min(created_ns) FROM versions v WHERE v.node_id = n.id) AS f,
                       (SELECT max(created_ns) FROM versions v WHERE v.node_id = n.id) AS l
                FROM nodes n LEFT JOIN versions cv ON cv.id = n.version_id
                WHERE n.kind IN {LEAF_KINDS}
                UNION ALL
                SELECT d.id, coalesce(sum(c.artifacts), 0), coalesce(sum(c.logical_bytes), 0),
                       min(c.first_write_ns), max(c.last_write_ns)
                FROM nodes d LEFT JOIN nodes c ON c.parent_id = d.id
                WHERE d.kind NOT IN {LEAF_KINDS} GROUP BY d.id
            )
            SELECT n.id, {stored}, fresh.a, fresh.b, fresh.f, fresh.l
            FROM fresh JOIN nodes n ON n.id = fresh.id
            WHERE (n.artifacts, n.logical_bytes) != (fresh.a, fresh.b)
               OR n.first_write_ns IS NOT fresh.f OR n.last_write_ns IS NOT fresh.l
            ORDER BY n.id
            """
        ).fetchall()
        return len(rows), [
            f"{self.path_of(row[0])}: aggregates ({', '.join(AGGREGATES)}) are "
            f"{tuple(row[1:5])}, recomputed {tuple(row[5:9])}"
            for row in rows[:limit]]

    # -- repair and gc --------------------------------------------------------------------

    def recompute_aggregates(self) -> None:
        """fsck --repair: every node's aggregate columns from scratch, in one transaction."""
        with self._transaction() as db:
            schema.recompute_aggregates(db)

    def repair(self, plan: RepairPlan, now_ns: int) -> int:
        """Apply what fsck --repair decided, in one transaction (unfinished files then go in
        batches). Returns refcounts fixed."""
        fixed = 0
        with self._transaction() as db:
            for chunk in chunks(plan.damaged):
                db.execute(
                    f"UPDATE blobs SET damaged_ns = ? WHERE id IN ({marks(chunk)}) "
                    "AND damaged_ns IS NULL",
                    (now_ns, *chunk),
                )
            for chunk in chunks(plan.sound):
                db.execute(
                    f"UPDATE blobs SET damaged_ns = NULL WHERE id IN ({marks(chunk)})", chunk)
            if plan.drift:
                before = db.total_changes
                db.execute(
                    f"""
                    WITH {LIVE_REFS}
                    UPDATE blobs SET refcount = coalesce(
                        (SELECT n FROM live WHERE live.blob_id = blobs.id), 0)
                    WHERE refcount !=
                        coalesce((SELECT n FROM live WHERE live.blob_id = blobs.id), 0)
                    """
                )
                fixed = db.total_changes - before
        if plan.remove_unpublished:
            self.remove_unpublished()
        return fixed

    def superseded_versions(self) -> list[tuple[int, int | None, str]]:
        """(version id, live node id or None, path) of every version that is not current,
        newest first."""
        rows = self._db.execute(
            "SELECT v.id, n.id, v.path FROM versions v LEFT JOIN nodes n ON n.id = v.node_id "
            "WHERE v.replaced_ns IS NOT NULL ORDER BY v.id DESC"
        )
        return [(row[0], row[1], row[2]) for row in rows]

    def collect(self, version_ids: list[int], *, keep_blobs: set[str], dry_run: bool) -> GcPlan:
        """Remove versions, then every blob row nothing references any more. Blobs in
        `keep_blobs` (writes in flight are about to use them) are left alone.

        One transaction per GC_BATCH rows: one for all would put about every page of the rows
        it deletes into the WAL, more than a full disk's reserve holds. Each batch leaves the
        manifest consistent (superseded versions and unreferenced blob rows carry no
        refcount), so a stop between two loses nothing and the next gc goes on. A dry run is
        one transaction, rolled back."""
        if dry_run:
            with self._transaction(commit=False):
                for chunk in chunks(version_ids):
                    self._delete_versions(chunk)
                freed = self._unreferenced_blobs(keep_blobs)
            return GcPlan(len(version_ids), freed)
        for chunk in chunks(version_ids, GC_BATCH):
            with self._transaction():
                self._delete_versions(chunk)
        freed = self._unreferenced_blobs(keep_blobs)
        for chunk in chunks([blob.blob_id for blob in freed], GC_BATCH):
            with self._transaction() as db:
                db.execute(f"DELETE FROM blobs WHERE id IN ({marks(chunk)})", chunk)
        return GcPlan(len(version_ids), freed)

    def _unreferenced_blobs(self, keep_blobs: set[str]) -> list[BlobRef]:
        rows = self._db.execute(
            f"SELECT {BLOB.select} FROM blobs b WHERE refcount = 0 AND NOT EXISTS "
            "(SELECT 1 FROM versions v WHERE v.blob_id = b.id) ORDER BY id"
        ).fetchall()
        return [blob for blob in map(BLOB.decode, rows) if blob.digest not in keep_blobs]
