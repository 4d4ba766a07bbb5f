"""The maintenance part of the SQLite manifest: statistics, checks, repair and gc.

Owns: the totals and per-directory statistics, the checks fsck runs against the rows
(dangling references, refcount and aggregate drift, unpublished files), applying a repair plan,
and the gc transaction that drops history and the blob rows nothing references. Must not touch
blob files (callers delete the files of the blob rows gc returns) or decide what to repair.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from cafs import schema
from cafs.manifest_api import (
    DirStats,
    GcPlan,
    RepairPlan,
    RestrictedDir,
    SharingStats,
    Space,
    Totals,
)
from cafs.model import RUNS_INODE, BlobRef
from cafs.sqlite_manifest.columns import (
    AGGREGATES,
    BLOB,
    DIR_STATS,
    GC_BATCH,
    HELD,
    LEAF_KINDS,
    LIVE_REFS,
    SUBTREE,
    chunks,
    marks,
)
from cafs.sqlite_manifest.rows import Rows

# The directories below an execution (records leave out those a reader may not list); spelled
# as the index nodes_subdirs is, so both databases use it.
DIR_KINDS = "('layer', 'dir')"
# Read and search for owner, group and others: a directory everyone may list.
EVERYONE_LISTS = 0o555


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

    def space(self) -> Space:
        """Each blob is live (a current version holds it), history (only old versions do) or
        neither; of those not live, gc removes the ones no version of a history a live
        artifact holds needs (a version without a history counts as kept, as gc keeps it)."""
        db = self._db
        blobs = db.execute(
            f"""
            WITH flags AS (
                SELECT b.size, b.stored_size,
                       CASE WHEN b.refcount > 0 THEN 1 ELSE 0 END AS live,
                       CASE WHEN EXISTS (SELECT 1 FROM versions v WHERE v.blob_id = b.id)
                            THEN 1 ELSE 0 END AS versioned,
                       CASE WHEN EXISTS (SELECT 1 FROM versions v
                               LEFT JOIN histories h ON h.id = v.history_id
                               WHERE v.blob_id = b.id AND (h.id IS NULL OR {HELD}))
                            THEN 1 ELSE 0 END AS kept
                FROM blobs b
            ),
            -- 1/0 flags (portable SQL: PostgreSQL does no arithmetic on booleans)
            sets AS (SELECT size, stored_size, live, (1 - live) * versioned AS old,
                            (1 - live) * (1 - kept) AS gone FROM flags)
            SELECT coalesce(sum(live), 0), coalesce(sum(size * live), 0),
                   coalesce(sum(stored_size * live), 0),
                   coalesce(sum(old), 0), coalesce(sum(size * old), 0),
                   coalesce(sum(stored_size * old), 0),
                   coalesce(sum(gone), 0), coalesce(sum(size * gone), 0),
                   coalesce(sum(stored_size * gone), 0)
            FROM sets
            """
        ).fetchone()
        history_versions = db.execute(
            "SELECT count(*) FROM versions WHERE replaced_ns IS NOT NULL").fetchone()[0]
        reclaimable_versions = db.execute(
            f"SELECT count(*) FROM versions v JOIN histories h ON h.id = v.history_id "
            f"WHERE NOT {HELD}").fetchone()[0]
        live, live_size, live_stored, old, old_size, old_stored, gone, gone_size, gone_stored = (
            int(value) for value in blobs)
        return Space(live, live_size, live_stored, history_versions, old, old_size, old_stored,
                     reclaimable_versions, gone, gone_size, gone_stored)

    def dir_stats(self, top: int) -> DirStats:
        """Aggregates over the artifacts below a directory: its row's aggregate columns."""
        row = self._db.execute(
            f"SELECT {DIR_STATS.select} FROM nodes WHERE id = ?", (top,)).fetchone()
        return DIR_STATS.decode(row) if row else DirStats(0, 0, None, None)

    def restricted_dirs(self, top: int) -> list[RestrictedDir]:
        """Directories below `top` whose mode lacks read or search (0o555) for someone: a walk
        of the directories alone, through the index nodes_subdirs (schema m010), never of the
        files beside them. Each carries the nearest such directory above it (`fence`), so a
        caller can tell which ones another hides."""
        rows = self._db.execute(
            f"""
            WITH RECURSIVE d(id, mode, uid, gid, fence) AS (
                SELECT id, mode, uid, gid, CAST(NULL AS BIGINT) FROM nodes
                WHERE parent_id = :top AND kind IN {DIR_KINDS}
                UNION ALL
                SELECT n.id, n.mode, n.uid, n.gid,
                       CASE WHEN (d.mode & {EVERYONE_LISTS}) = {EVERYONE_LISTS}
                            THEN d.fence ELSE d.id END
                FROM d JOIN nodes n ON n.parent_id = d.id
                WHERE n.kind IN {DIR_KINDS}
            )
            SELECT id, mode, uid, gid, fence FROM d
            WHERE (mode & {EVERYONE_LISTS}) != {EVERYONE_LISTS} ORDER BY id
            """,
            {"top": top},
        ).fetchall()
        return [RestrictedDir(*row) for row in rows]

    def visible_stats(self, top: int, hidden: Collection[int]) -> dict[int, DirStats]:
        """Sums are the directory's less its hidden parts (aggregates add up exactly); the
        oldest and newest writes are read again, one index seek each, from the children of
        each directory on the way down to a hidden one, skipping the children on that way."""
        db = self._db
        parent_of: dict[int, int] = {}
        for ino in hidden:
            while ino != top and ino not in parent_of:
                row = db.execute("SELECT parent_id FROM nodes WHERE id = ?", (ino,)).fetchone()
                if row is None:
                    break
                parent_of[ino] = ino = row[0]
        between = {top} | {parent for child, parent in parent_of.items()}
        set_aside: dict[int, list[int]] = {}
        for child, parent in parent_of.items():
            set_aside.setdefault(parent, []).append(child)
        stats: dict[int, DirStats] = {}
        for chunk in chunks(sorted(between | set(parent_of))):
            for row in db.execute(f"SELECT id, {DIR_STATS.select} FROM nodes "
                                  f"WHERE id IN ({marks(chunk)})", chunk):
                stats[row[0]] = DIR_STATS.decode(row[1:])
        visible: dict[int, DirStats] = {}

        def seen(directory: int) -> DirStats:
            own = stats.get(directory, DirStats(0, 0, None, None))
            artifacts, size = own.artifacts, own.logical_bytes
            firsts: list[int] = []
            lasts: list[int] = []
            aside = set(set_aside.get(directory, ()))
            for child in aside:
                left_out = stats.get(child, DirStats(0, 0, None, None))
                artifacts -= left_out.artifacts
                size -= left_out.logical_bytes
                if child in between:  # a part of it is seen
                    part = seen(child)
                    artifacts += part.artifacts
                    size += part.logical_bytes
                    firsts += [part.first_write_ns] if part.first_write_ns is not None else []
                    lasts += [part.last_write_ns] if part.last_write_ns is not None else []
            # The first child in the index's order that is not set aside: among the first
            # len(aside) + 1, whatever the directory holds.
            for column, found, order in (("first_write_ns", firsts, "ASC"),
                                         ("last_write_ns", lasts, "DESC")):
                rows = db.execute(
                    f"SELECT id, {column} FROM nodes WHERE parent_id = ? AND {column} IS NOT "
                    f"NULL ORDER BY {column} {order} LIMIT ?", (directory, len(aside) + 1))
                found += [value for ino, value in rows if ino not in aside][:1]
            result = DirStats(artifacts, size, min(firsts, default=None),
                              max(lasts, default=None))
            visible[directory] = result
            return result

        seen(top)
        return visible

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
                (SELECT count(*), coalesce(sum(size), 0) FROM cur) AS mine,
                (SELECT coalesce(sum(b.size), 0), coalesce(sum(b.stored_size), 0)
                 FROM held JOIN blobs b ON b.id = held.blob_id WHERE b.refcount <= held.uses)
                AS only_mine
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
        for (version_id,) in db.execute(
            "SELECT v.id FROM versions v LEFT JOIN histories h ON h.id = v.history_id "
            "WHERE h.id IS NULL OR v.number IS NULL"
        ):
            problems.append(f"version {version_id}: its path history is missing")
        for (node_id,) in db.execute(
            "SELECT n.id FROM nodes n LEFT JOIN histories h ON h.id = n.history_id "
            "WHERE n.history_id IS NOT NULL AND h.id IS NULL"
        ):
            problems.append(f"node {node_id}: its path history is missing")
        # A published artifact holds the history its current version is in (an import or a
        # merge that forgot one would leave `cafs log` of its path empty or wrong).
        for (node_id,) in db.execute(
            f"SELECT n.id FROM nodes n JOIN versions v ON v.id = n.version_id "
            f"WHERE n.kind IN {LEAF_KINDS} AND (n.history_id IS NULL "
            f"OR v.history_id IS NOT n.history_id)"
        ):
            problems.append(f"node {node_id}: it does not hold its current version's history")
        for (history_id,) in db.execute(
            "SELECT h.id FROM histories h WHERE h.last_number < (SELECT max(number) "
            "FROM versions v WHERE v.history_id = h.id)"
        ):
            problems.append(f"history {history_id}: a version has a number not yet given")
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
                SELECT n.id, CASE WHEN n.version_id IS NULL THEN 0 ELSE 1 END AS a,
                       coalesce(cv.size, 0) AS b,
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

    def blobs_stored_after(self, since_ns: int) -> list[BlobRef]:
        """Blob rows newer than a durable point (see SqliteCore.sync): their files may not
        have reached the disk before a power loss."""
        rows = self._db.execute(
            f"SELECT {BLOB.select} FROM blobs b WHERE created_ns > ? ORDER BY id",
            (since_ns,)).fetchall()
        return [BLOB.decode(row) for row in rows]

    def roll_back(self, blob_ids: list[int], now_ns: int) -> list[int]:
        """After a power loss, the files of these blobs did not reach the disk whole: every
        version holding one goes; an artifact whose current version goes gets its newest
        remaining version back, or, with none left, is left unpublished (start-up's
        remove_unpublished then removes it); the blob rows go. One transaction. Returns the
        ids of the artifacts whose content changed."""
        with self._transaction() as db:
            db.execute("CREATE TEMP TABLE IF NOT EXISTS rolled_back (id INTEGER PRIMARY KEY)")
            db.execute("DELETE FROM rolled_back")
            db.executemany("INSERT OR IGNORE INTO rolled_back VALUES (?)",
                           [(blob_id,) for blob_id in blob_ids])
            bad = "(SELECT id FROM rolled_back)"
            touched = [row[0] for row in db.execute(
                f"SELECT DISTINCT node_id FROM versions WHERE blob_id IN {bad}")]
            current = [row[0] for row in db.execute(
                f"SELECT n.id FROM nodes n JOIN versions v ON v.id = n.version_id "
                f"WHERE v.blob_id IN {bad}")]
            for node_id in current:
                # The newest remaining version of its path history (schema m007), which
                # may have been published under another name (a rename joined it).
                previous = db.execute(
                    f"SELECT v.id, v.blob_id, v.mtime_ns FROM versions v JOIN nodes n "
                    f"ON n.id = ? AND v.history_id = n.history_id "
                    f"WHERE v.blob_id NOT IN {bad} ORDER BY v.number DESC LIMIT 1",
                    (node_id,)).fetchone()
                if previous is None:
                    db.execute("UPDATE nodes SET version_id = NULL WHERE id = ?", (node_id,))
                    continue
                version_id, blob_id, mtime_ns = previous
                db.execute("UPDATE versions SET replaced_ns = NULL WHERE id = ?", (version_id,))
                db.execute("UPDATE blobs SET refcount = refcount + 1 WHERE id = ?", (blob_id,))
                db.execute("UPDATE nodes SET version_id = ?, mtime_ns = ?, ctime_ns = ? "
                           "WHERE id = ?", (version_id, mtime_ns, now_ns, node_id))
            db.execute(f"DELETE FROM versions WHERE blob_id IN {bad}")
            for node_id in touched:
                self._aggregate_file(node_id)
            db.execute(f"DELETE FROM blobs WHERE id IN {bad}")
            db.execute("DELETE FROM rolled_back")
        return current

    def superseded_versions(self) -> list[tuple[int, int, bool]]:
        """(version id, history id, whether a live artifact holds that history) of every
        version that is not current: each history's newest (highest number) first. A version
        without a history (which fsck reports) counts as held: gc keeps it."""
        rows = self._db.execute(
            f"SELECT v.id, coalesce(v.history_id, -v.id), h.id IS NULL OR {HELD} "
            "FROM versions v LEFT JOIN histories h ON h.id = v.history_id "
            "WHERE v.replaced_ns IS NOT NULL ORDER BY v.history_id, v.number DESC"
        )
        return [(row[0], row[1], bool(row[2])) for row in rows]

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
                    self._delete_versions_and_histories(chunk)
                freed = self._unreferenced_blobs(keep_blobs)
            return GcPlan(len(version_ids), freed)
        for chunk in chunks(version_ids, GC_BATCH):
            with self._transaction():
                self._delete_versions_and_histories(chunk)
        freed = self._unreferenced_blobs(keep_blobs)
        for chunk in chunks([blob.blob_id for blob in freed], GC_BATCH):
            with self._transaction() as db:
                db.execute(f"DELETE FROM blobs WHERE id IN ({marks(chunk)})", chunk)
        return GcPlan(len(version_ids), freed)

    def _delete_versions_and_histories(self, version_ids: list[int]) -> None:
        """Remove versions, and the histories of removed paths that this leaves empty (a
        path re-created after that starts again at 1)."""
        histories = [row[0] for row in self._db.execute(
            f"SELECT DISTINCT history_id FROM versions WHERE id IN ({marks(version_ids)}) "
            "AND history_id IS NOT NULL", version_ids)]
        self._delete_versions(version_ids)
        for chunk in chunks(histories):
            self._db.execute(
                f"DELETE FROM histories WHERE id IN (SELECT h.id FROM histories h "
                f"WHERE h.id IN ({marks(chunk)}) AND NOT {HELD} AND NOT EXISTS "
                "(SELECT 1 FROM versions v WHERE v.history_id = h.id))", chunk)

    def _unreferenced_blobs(self, keep_blobs: set[str]) -> list[BlobRef]:
        rows = self._db.execute(
            f"SELECT {BLOB.select} FROM blobs b WHERE refcount = 0 AND NOT EXISTS "
            "(SELECT 1 FROM versions v WHERE v.blob_id = b.id) ORDER BY id"
        ).fetchall()
        return [blob for blob in map(BLOB.decode, rows) if blob.digest not in keep_blobs]
