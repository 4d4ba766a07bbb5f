"""A file's first publish on PostgreSQL in fewer round trips than the SQLite parts' queries.

Owns: the PostgreSQL spelling of SqliteContent._record_first_version (same rows, same meaning):
the path, the history parked there and the ids of a new version and history are read in one
statement, sent with the blob's upsert without waiting between them, and a new history is made
in the statement that inserts the version, which waits for nothing (it goes with the COMMIT).
Must not decide anything the SQLite part does not: a publish on either back end leaves the
same rows (but for gaps in the ids).

Why: a small file's publish is most of its cost, and on a server every answer waited for is a
round trip (five here before, one now) plus the client's work per statement.
"""

from __future__ import annotations

from cafs.manifest_api import DirStats, NewVersion
from cafs.model import BlobRef, StoredBlob
from cafs.pg_manifest.core import PgCore
from cafs.sqlite_manifest.columns import HELD, INSERT_VERSION, UPSERT_BLOB, version_values
from cafs.sqlite_manifest.content import SqliteContent

# The node's path (as path_of spells it) and the history no live artifact holds whose home is
# that path (as _parked_at finds it), in one statement.
_PATH_AND_PARKED = f"""
WITH RECURSIVE up(id, parent_id, name, depth) AS (
    SELECT id, parent_id, name, 0 FROM nodes WHERE id = ?
    UNION ALL
    SELECT n.id, n.parent_id, n.name, up.depth + 1 FROM nodes n JOIN up ON n.id = up.parent_id
), p(path) AS (
    SELECT 'runs' || coalesce('/' || string_agg(name, '/' ORDER BY depth DESC), '') FROM up
)
SELECT p.path, (
    SELECT h.id FROM histories h WHERE h.path = p.path AND NOT {HELD}
    UNION ALL
    SELECT h.id FROM versions v JOIN histories h ON h.id = v.history_id
    WHERE v.path = p.path AND v.number = h.last_number AND h.path IS NULL AND NOT {HELD}
    LIMIT 1
), nextval('versions_id_seq'), nextval('histories_id_seq') FROM p
"""
# A new history numbered 1 and the version that starts it, their ids taken above: nothing to
# wait for, so it goes out with the node's update and the COMMIT. (An id taken and not used,
# a history's when one was parked, is a gap: ids are never reused.)
_VERSION_IN_NEW_HISTORY = (
    "WITH h AS (INSERT INTO histories (id, last_number) VALUES (:history_id, 1)) "
    "INSERT INTO versions (id, node_id, path, blob_id, size, mode, uid, gid, mtime_ns, "
    "ctime_ns, content_type, created_ns, replaced_ns, history_id, number) "
    "VALUES (:id, :node_id, :path, :blob_id, :size, :mode, :uid, :gid, :mtime_ns, :ctime_ns, "
    ":content_type, :created_ns, NULL, :history_id, 1)")


class PgContent(PgCore, SqliteContent):
    """SqliteContent's first publish, in one round trip on PostgreSQL."""

    def _record_first_version(self, stored: StoredBlob, new: NewVersion, parent_id: int,
                              before: DirStats) -> tuple[int, BlobRef]:
        db = self._pg
        found = db.execute(_PATH_AND_PARKED, (new.node_id,), wait=False)
        upserted = db.execute(UPSERT_BLOB + " RETURNING id, damaged_ns", {
            "sha256": stored.digest, "size": stored.size, "stored_size": stored.stored_size,
            "encoding": stored.encoding, "refcount": 1, "created_ns": new.now_ns,
            "fresh": stored.fresh,
        }, wait=False)
        path_row = found.fetchone()  # (both answers in one round trip)
        blob_row = upserted.fetchone()
        assert path_row is not None and blob_row is not None
        path, parked, new_version_id, new_history_id = path_row
        blob = BlobRef(int(blob_row[0]), stored.digest, stored.size, stored.stored_size,
                       stored.encoding, blob_row[1] is not None)
        values = version_values(
            node_id=new.node_id, path=str(path), blob_id=blob.blob_id, size=stored.size,
            mode=new.mode, uid=new.uid, gid=new.gid, mtime_ns=new.mtime_ns,
            ctime_ns=new.ctime_ns, content_type=new.content_type, created_ns=new.now_ns)
        if parked is None:
            version_id, history = int(new_version_id), int(new_history_id)
            db.execute(_VERSION_IN_NEW_HISTORY, {**values, "id": version_id,
                                                 "history_id": history}, answer=False)
        else:
            history = int(parked)
            db.execute("UPDATE histories SET path = NULL WHERE id = ? AND path IS NOT NULL",
                       (history,))
            version_id = int(db.execute(INSERT_VERSION, {
                **values, "history_id": history, "number": self._next_number(history),
            }).lastrowid or 0)
        self._point_at_first_version(new, version_id, history, stored.size, parent_id, before)
        return version_id, blob
