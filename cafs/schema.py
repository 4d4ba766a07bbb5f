"""The manifest schema and its migrations (sqlite-utils Migrations).

Owns: table definitions. Every column has a comment saying what it means and what must hold;
SQLite keeps those comments in sqlite_master, so `sqlite-utils schema manifest.sqlite` shows
them. Never edit an applied migration: add a new one.
"""

from __future__ import annotations

import sqlite3

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from cafs.model import FIRST_NODE_ID

migrations = Migrations("cafs")

_BLOBS = """
CREATE TABLE blobs (                       -- one row per distinct content in blobs/
    id          INTEGER PRIMARY KEY,       -- stable id; blobs/<sha256> in the mount is inode 2^48 + id
    sha256      TEXT    NOT NULL UNIQUE,   -- 64 lowercase hex: SHA-256 of the UNCOMPRESSED bytes; the file is blobs/<sha256[0:2]>/<sha256>
    size        INTEGER NOT NULL,          -- uncompressed bytes
    stored_size INTEGER NOT NULL,          -- bytes of the blob file on disk
    encoding    TEXT    NOT NULL CHECK (encoding IN ('raw', 'zstd')), -- raw bytes, or zstd seekable format (independent frames of <= 1 MiB + seek table)
    refcount    INTEGER NOT NULL DEFAULT 0 CHECK (refcount >= 0), -- live artifacts whose current version is this content; 0 = only history (or nothing) holds it
    created_ns  INTEGER NOT NULL           -- when this content was first stored (ns since the epoch)
)
"""

_NODES = """
CREATE TABLE nodes (                       -- the live namespace under runs/: one row per directory or artifact
    id          INTEGER PRIMARY KEY AUTOINCREMENT, -- the inode number; AUTOINCREMENT so a number is never reused
    parent_id   INTEGER NOT NULL,          -- nodes.id of the parent directory; 2 (runs/) for executions
    name        TEXT    NOT NULL,          -- one path component: UTF-8, 1..255 bytes, no '/' or NUL
    kind        TEXT    NOT NULL CHECK (kind IN ('execution', 'layer', 'dir', 'file')), -- execution = runs/<exec>, layer = runs/<exec>/<layer>, dir = sub-directory inside a layer, file = artifact
    mode        INTEGER NOT NULL,          -- permission bits (no file type bits; no setuid/setgid)
    uid         INTEGER NOT NULL,          -- owner: the creator, or as set by chown
    gid         INTEGER NOT NULL,          -- group owner
    mtime_ns    INTEGER NOT NULL,          -- modification time (ns), settable with touch
    ctime_ns    INTEGER NOT NULL,          -- status change time (ns)
    nlink       INTEGER NOT NULL DEFAULT 1, -- files: 1; directories: 2 + number of sub-directories
    version_id  INTEGER,                   -- files: versions.id of the current content; NULL for directories, and for a file whose first write is still open (such rows are removed at start-up)
    UNIQUE (parent_id, name)
)
"""

_VERSIONS = """
CREATE TABLE versions (                    -- one row per publish of an artifact's content; history stays until gc
    id           INTEGER PRIMARY KEY,      -- version id; increases with every publish
    node_id      INTEGER NOT NULL,         -- nodes.id of the artifact it was published to (that node may since be deleted)
    path         TEXT    NOT NULL,         -- the artifact's path at publish time, relative to the mount: runs/<exec>/<layer>/...
    blob_id      INTEGER NOT NULL REFERENCES blobs(id), -- the content
    size         INTEGER NOT NULL,         -- uncompressed bytes (= blobs.size)
    mode         INTEGER NOT NULL,         -- permission bits at publish
    uid          INTEGER NOT NULL,         -- the writer's uid
    gid          INTEGER NOT NULL,         -- the writer's gid
    mtime_ns     INTEGER NOT NULL,         -- modification time at publish (ns)
    ctime_ns     INTEGER NOT NULL,         -- status change time at publish (ns)
    content_type TEXT,                     -- MIME type guessed from the name, NULL if unknown
    created_ns   INTEGER NOT NULL,         -- when this version was published (ns)
    replaced_ns  INTEGER                   -- when a newer version, an unlink or a rename over it replaced it; NULL while current
)
"""

_TAGS = """
CREATE TABLE tags (                        -- user xattrs (user.* other than user.cafs.*) on artifacts and directories
    node_id INTEGER NOT NULL,              -- nodes.id the tag is on
    name    TEXT    NOT NULL,              -- full xattr name, e.g. 'user.stage'
    value   BLOB    NOT NULL,              -- the xattr value, bytes as given (at most 64 KiB, enforced by the kernel)
    PRIMARY KEY (node_id, name)
) WITHOUT ROWID
"""

_VIEWS = [
    """
CREATE VIEW executions AS                  -- executions: the directories runs/<exec>
SELECT id, name, uid, gid, mode, mtime_ns, ctime_ns FROM nodes WHERE kind = 'execution'
""",
    """
CREATE VIEW layers AS                      -- layers: the directories runs/<exec>/<layer>
SELECT l.id, e.name AS execution, l.name, l.uid, l.gid, l.mode, l.mtime_ns, l.ctime_ns
FROM nodes l JOIN nodes e ON e.id = l.parent_id WHERE l.kind = 'layer'
""",
    """
CREATE VIEW artifacts AS                   -- every live artifact with its path and current content
WITH RECURSIVE paths(id, path, execution, layer) AS (
    SELECT id, 'runs/' || name, name, NULL FROM nodes WHERE parent_id = 2
    UNION ALL
    SELECT n.id, p.path || '/' || n.name, p.execution, coalesce(p.layer, n.name)
    FROM nodes n JOIN paths p ON n.parent_id = p.id
)
SELECT p.path, p.execution, p.layer, n.id AS node_id, v.id AS version_id, b.sha256, v.size,
       b.stored_size, b.encoding, n.mode, n.uid, n.gid, n.mtime_ns, n.ctime_ns, v.content_type,
       v.created_ns AS published_ns
FROM paths p
JOIN nodes n ON n.id = p.id
JOIN versions v ON v.id = n.version_id
JOIN blobs b ON b.id = v.blob_id
WHERE n.kind = 'file'
""",
]

_INDEXES = [
    "CREATE INDEX versions_node ON versions(node_id)",
    "CREATE INDEX versions_blob ON versions(blob_id)",
    # Start-up finds files whose first write never completed without scanning every node.
    "CREATE INDEX nodes_unpublished ON nodes(id) WHERE kind = 'file' AND version_id IS NULL",
]


@migrations()
def m001_initial(db: Database) -> None:
    for statement in [_BLOBS, _NODES, _VERSIONS, _TAGS, *_INDEXES, *_VIEWS]:
        db.execute(statement)
    # Node ids are inode numbers: keep them above the fixed inodes (root, runs, blobs).
    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('nodes', 15)")


# Life cycle (fsck repair, sealing, tag queries, history by path). ALTER keeps /* */ comments
# (a -- comment would swallow the closing parenthesis SQLite appends).
_M002 = [
    "ALTER TABLE blobs ADD COLUMN damaged_ns INTEGER /* set by fsck --repair when the file is "
    "missing or its bytes do not hash to sha256: reads of artifacts holding it fail with EIO "
    "until the same content is written or imported again; NULL = sound */",
    "ALTER TABLE nodes ADD COLUMN sealed_ns INTEGER /* executions: when cafs seal made the run "
    "immutable (every change inside it is EROFS); NULL = open */",
    "ALTER TABLE nodes ADD COLUMN root_sha256 TEXT /* executions, once sealed: SHA-256 over the "
    "sorted lines '<path below the execution>\\0<sha256>\\n' of its artifacts */",
    # find --tag name=value without a scan of every tag.
    "CREATE INDEX tags_value ON tags(name, value)",
    # cafs log PATH: versions published at a path (the node there may since have been replaced).
    "CREATE INDEX versions_path ON versions(path)",
]


@migrations()
def m002_life_cycle(db: Database) -> None:
    for statement in _M002:
        db.execute(statement)


# Raw blobs carry block checksums (raw+xxh64), so a flipped byte is found at read time. SQLite
# cannot ALTER a CHECK constraint; widening one is the documented case where editing the stored
# CREATE text is safe (no row can violate the wider check, and the file format is unchanged).
_ENCODING_CHECK_BEFORE = (
    "CHECK (encoding IN ('raw', 'zstd')), -- raw bytes, or zstd seekable format "
    "(independent frames of <= 1 MiB + seek table)")
_ENCODING_CHECK_AFTER = (
    "CHECK (encoding IN ('raw', 'raw+xxh64', 'zstd')), -- raw+xxh64: the bytes, then XXH64 per "
    "64 KiB block and a footer; zstd: seekable format (independent frames of <= 1 MiB, each "
    "with a checksum, + seek table); raw: the bytes alone (blobs stored before raw+xxh64)")


@migrations()
def m003_checked_raw(db: Database) -> None:
    sql = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'blobs'"
                     ).fetchone()[0]
    if _ENCODING_CHECK_BEFORE not in sql:
        raise RuntimeError("manifest: the blobs table is not the one migration m003 expects")
    version = db.execute("PRAGMA schema_version").fetchone()[0]
    db.execute("PRAGMA writable_schema = ON")
    db.execute("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'blobs'",
               [sql.replace(_ENCODING_CHECK_BEFORE, _ENCODING_CHECK_AFTER)])
    db.execute(f"PRAGMA schema_version = {version + 1}")
    db.execute("PRAGMA writable_schema = OFF")


# Aggregates, so that a .record.json costs a few indexed reads whatever the layer holds: every
# node carries the totals of its subtree (a file: itself). The manifest keeps them in the same
# transaction as every change (publish, unlink, rename, gc, import) by walking up the parents;
# min/max cannot be undone by a subtraction, so a directory's times are re-read from its children
# through the two indexes (parent_id, time), one seek each.
_M004 = [
    "ALTER TABLE nodes ADD COLUMN artifacts INTEGER NOT NULL DEFAULT 0 /* files: 1 once "
    "published (version_id set), else 0; directories: the published artifacts below them, at "
    "any depth (= sum over the children) */",
    "ALTER TABLE nodes ADD COLUMN logical_bytes INTEGER NOT NULL DEFAULT 0 /* files: the size "
    "of the current version (0 before the first publish); directories: the sum over the "
    "children */",
    "ALTER TABLE nodes ADD COLUMN first_write_ns INTEGER /* files: the oldest created_ns of "
    "the versions whose node_id is this node (history included, until gc drops it); "
    "directories: the minimum over the children; NULL when there is none */",
    "ALTER TABLE nodes ADD COLUMN last_write_ns INTEGER /* as first_write_ns, the newest */",
    # A directory's times after a child left: one index seek instead of a scan of its children.
    "CREATE INDEX nodes_first_write ON nodes(parent_id, first_write_ns)",
    "CREATE INDEX nodes_last_write ON nodes(parent_id, last_write_ns)",
]


# Nodes with versions (cafs.model.Kind.has_versions): the leaves of the tree. Symlinks (m006)
# count as artifacts in the aggregates, their target's length as their logical bytes.
LEAF_KINDS = "('file', 'symlink')"


def recompute_aggregates(db: sqlite3.Connection, top: int | None = None) -> None:
    """Set the aggregate columns (m004) from the versions: of every node, or of `top` and the
    nodes below it (its ancestors are the caller's). Files from their own versions, then
    directories level by level from the deepest up. O(nodes), inside the caller's transaction."""
    db.execute("DROP TABLE IF EXISTS temp.aggregate_dirs")
    db.execute("CREATE TEMP TABLE aggregate_dirs (id INTEGER PRIMARY KEY, depth INTEGER)")
    start = "SELECT id, 1 FROM nodes WHERE " + ("parent_id = 2" if top is None else "id = :top")
    db.execute(
        f"""
        WITH RECURSIVE d(id, depth) AS (
            {start} AND kind NOT IN {LEAF_KINDS}
            UNION ALL
            SELECT n.id, d.depth + 1 FROM nodes n JOIN d ON n.parent_id = d.id
            WHERE n.kind NOT IN {LEAF_KINDS}
        )
        INSERT INTO aggregate_dirs SELECT id, depth FROM d
        """,
        {"top": top},
    )
    files = f"kind IN {LEAF_KINDS}" + ("" if top is None else
                               " AND parent_id IN (SELECT id FROM aggregate_dirs)")
    db.execute(
        f"""
        UPDATE nodes SET
            artifacts = CASE WHEN version_id IS NULL THEN 0 ELSE 1 END,
            logical_bytes = coalesce((SELECT size FROM versions v WHERE v.id = nodes.version_id), 0),
            first_write_ns = (SELECT min(created_ns) FROM versions v WHERE v.node_id = nodes.id),
            last_write_ns = (SELECT max(created_ns) FROM versions v WHERE v.node_id = nodes.id)
        WHERE {files}
        """
    )
    db.execute("UPDATE nodes SET artifacts = 0, logical_bytes = 0, first_write_ns = NULL, "
               "last_write_ns = NULL WHERE id IN (SELECT id FROM aggregate_dirs)")
    deepest = db.execute("SELECT max(depth) FROM aggregate_dirs").fetchone()[0] or 0
    for depth in range(deepest, 0, -1):
        db.execute(
            """
            WITH level AS (SELECT id FROM aggregate_dirs WHERE depth = ?),
            agg AS (
                SELECT c.parent_id AS id, sum(c.artifacts) AS a, sum(c.logical_bytes) AS b,
                       min(c.first_write_ns) AS f, max(c.last_write_ns) AS l
                FROM nodes c WHERE c.parent_id IN (SELECT id FROM level) GROUP BY c.parent_id
            )
            UPDATE nodes SET artifacts = agg.a, logical_bytes = agg.b, first_write_ns = agg.f,
                             last_write_ns = agg.l
            FROM agg WHERE agg.id = nodes.id
            """,
            (depth,),
        )
    db.execute("DROP TABLE temp.aggregate_dirs")


@migrations()
def m004_aggregates(db: Database) -> None:
    for statement in _M004:
        db.execute(statement)
    recompute_aggregates(db.conn)


# Facts about the manifest as a whole, one row. The durable commit behind fsync writes here:
# the manifest's files are only ever touched through SQLite (a descriptor of them opened and
# closed by cafs itself would drop SQLite's POSIX locks, and another opener would then delete the
# WAL under the daemon).
_STORE_STATE = """
CREATE TABLE store_state (                 -- one row: the manifest as a whole
    id          INTEGER PRIMARY KEY CHECK (id = 1), -- always 1
    synced_ns   INTEGER,                   -- when a commit with synchronous=FULL last made every earlier commit durable against power loss (an fsync through the mount)
    checked_ns  INTEGER                    -- when a daemon last started on this manifest after checking it (and its WAL) intact: orphan blob files older than this are what a crash left; newer ones, with no commit after them, may hold artifacts whose rows were lost
)
"""


@migrations()
def m005_store_state(db: Database) -> None:
    db.execute(_STORE_STATE)
    db.execute("INSERT INTO store_state (id) VALUES (1)")


# Symlinks inside layers. A symlink is a node of kind 'symlink' whose versions hold its target
# as a blob, exactly as a file's versions hold its bytes: dedup, history (`cafs log`), records,
# bundles, fsck and gc need nothing new. SQLite cannot ALTER a CHECK constraint; this one does
# not only widen it from outside (m003's case) but is a table of ~millions of rows others
# reference by id, so it is rebuilt the way SQLite documents (create, copy, drop, rename) from
# the stored CREATE text, keeping every column's comment, the AUTOINCREMENT counter (inode
# numbers are never reused), the indexes and the views.
_KIND_BEFORE = (
    "kind        TEXT    NOT NULL CHECK (kind IN ('execution', 'layer', 'dir', 'file')), -- "
    "execution = runs/<exec>, layer = runs/<exec>/<layer>, dir = sub-directory inside a layer, "
    "file = artifact")
_KIND_AFTER = (
    "kind        TEXT    NOT NULL CHECK (kind IN ('execution', 'layer', 'dir', 'file', "
    "'symlink')), -- execution = runs/<exec>, layer = runs/<exec>/<layer>, dir = sub-directory "
    "inside a layer, file = artifact, symlink = symbolic link inside a layer (its versions' "
    "blobs hold the target bytes; mode is always 0777)")


@migrations()
def m006_symlinks(db: Database) -> None:
    conn = db.conn
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'nodes'"
                       ).fetchone()[0]
    head = next((h for h in ('CREATE TABLE nodes (', 'CREATE TABLE "nodes" (')
                 if sql.startswith(h)), None)
    if _KIND_BEFORE not in sql or head is None:
        raise RuntimeError("manifest: the nodes table is not the one migration m006 expects")
    # Views and indexes on nodes go with the old table; they are made again from their text.
    views = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'view'").fetchall()
    indexes = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND "
                           "tbl_name = 'nodes' AND sql IS NOT NULL").fetchall()
    sequence = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'nodes'").fetchone()
    for name, _ in views:
        conn.execute(f'DROP VIEW "{name}"')
    conn.execute(sql.replace(_KIND_BEFORE, _KIND_AFTER).replace(
        head, "CREATE TABLE nodes_new (", 1))
    columns = ", ".join(row[1] for row in conn.execute("PRAGMA table_info(nodes)"))
    conn.execute(f"INSERT INTO nodes_new ({columns}) SELECT {columns} FROM nodes")
    conn.execute("DROP TABLE nodes")
    conn.execute("ALTER TABLE nodes_new RENAME TO nodes")
    seq = max(sequence[0] if sequence else 0, FIRST_NODE_ID - 1)
    conn.execute("DELETE FROM sqlite_sequence WHERE name IN ('nodes', 'nodes_new')")
    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('nodes', "
                 "max(?, (SELECT coalesce(max(id), 0) FROM nodes)))", (seq,))
    for (index_sql,) in indexes:
        conn.execute(index_sql)
    for _, view_sql in views:
        conn.execute(view_sql)


# Path histories: `cafs log PATH` lists every version a path has held, numbered 1..n, through
# renames (rsync's temp file, `mv` over it, an editor's save), `cp` over it and rm + re-create.
# A history is held by one live artifact (nodes.history_id) or, once that was removed, parked
# at its home path, so the next artifact published or moved there continues it. A rename moves
# the versions of the artifact that moves into the history parked where it lands (numbered
# after that history's newest); the replaced target's versions stay with the path. Numbers are
# stored, never recomputed: gc removes rows and leaves the numbers of the others alone. The
# home is the newest version's path unless recorded, so an unlink writes nothing (rm -rf on a
# full disk only frees space).
_HISTORIES = """
CREATE TABLE histories (                   -- one row per path history: the versions one path has held
    id          INTEGER PRIMARY KEY,       -- history id (nodes.history_id, versions.history_id); held while a node has it, else parked
    path        TEXT,                      -- its home path (runs/<exec>/<layer>/...) where that differs from its newest version's path (NULL: that path): set when its artifact moved there by a rename, or was removed there after its directory moved; where it is parked
    last_number INTEGER NOT NULL DEFAULT 0 -- the number its newest version got: the next gets last_number + 1; never decreases, so gc never renumbers and no number is given twice
)
"""

_M007 = [
    _HISTORIES,
    "ALTER TABLE nodes ADD COLUMN history_id INTEGER /* files: histories.id of the path history "
    "this artifact continues; set at its first publish, or when it moves onto a path that has "
    "one; NULL for directories and for files never published */",
    "ALTER TABLE versions ADD COLUMN history_id INTEGER /* histories.id of the path history "
    "this version belongs to; it moves with its artifact through renames */",
    "ALTER TABLE versions ADD COLUMN number INTEGER /* its number in that history: 1..n in the "
    "order versions joined it; stable (gc removes rows, never renumbers) */",
]
_M007_INDEXES = [
    # cafs log PATH / cat PATH@N: one seek; also keeps two versions from sharing a number.
    "CREATE UNIQUE INDEX versions_history ON versions(history_id, number)",
    # gc and stats: is this history held by a live artifact.
    "CREATE INDEX nodes_history ON nodes(history_id) WHERE history_id IS NOT NULL",
    # The history parked at a path, where its home was recorded.
    "CREATE INDEX histories_path ON histories(path) WHERE path IS NOT NULL",
]


def backfill_histories(db: sqlite3.Connection) -> None:
    """Give existing versions the history `cafs log` showed for them before m007: a live
    artifact's own versions, and versions of removed artifacts published at the path a live
    artifact has now, make that artifact's history; the remaining versions of removed
    artifacts are parked at the path they were published at. Numbered 1..n in publish order.
    O(versions)."""
    live = f"kind IN {LEAF_KINDS} AND version_id IS NOT NULL"
    db.execute("DROP TABLE IF EXISTS temp.live_paths")
    db.execute("CREATE TEMP TABLE live_paths (path TEXT PRIMARY KEY, node_id INTEGER)")
    db.execute("INSERT INTO live_paths SELECT path, node_id FROM artifacts")
    # Histories are empty here, so a live artifact's history may take its node id.
    db.execute(f"INSERT INTO histories (id) SELECT id FROM nodes WHERE {live}")
    db.execute(f"UPDATE nodes SET history_id = id WHERE {live}")
    db.execute("UPDATE versions SET history_id = n.history_id FROM nodes n "
               "WHERE n.id = versions.node_id AND n.history_id IS NOT NULL")
    db.execute("UPDATE versions SET history_id = p.node_id FROM live_paths p "
               "WHERE versions.history_id IS NULL AND p.path = versions.path")
    db.execute("INSERT INTO histories (path) SELECT DISTINCT path FROM versions "
               "WHERE history_id IS NULL ORDER BY path")
    db.execute("UPDATE versions SET history_id = h.id FROM histories h "
               "WHERE versions.history_id IS NULL AND h.path = versions.path")
    db.execute("UPDATE versions SET number = r.number FROM (SELECT id, row_number() OVER "
               "(PARTITION BY history_id ORDER BY id) AS number FROM versions) r "
               "WHERE versions.id = r.id")
    db.execute("UPDATE histories SET last_number = coalesce((SELECT max(number) FROM versions v "
               "WHERE v.history_id = histories.id), 0)")
    # Each parked history's versions share one path, so its newest version's path is its home.
    db.execute("UPDATE histories SET path = NULL")
    db.execute("DROP TABLE temp.live_paths")


@migrations()
def m007_histories(db: Database) -> None:
    for statement in _M007:
        db.execute(statement)
    backfill_histories(db.conn)
    for statement in _M007_INDEXES:
        db.execute(statement)


# Access times that a user sets (touch -a, utimensat) are kept; reads never change them (the
# mount is noatime: a read must not write the manifest).
_M008 = [
    "ALTER TABLE nodes ADD COLUMN atime_ns INTEGER /* access time (ns) as last set explicitly "
    "(touch -a, utimensat); NULL = never set, and stat shows mtime_ns. Reads never change it "
    "(the mount is noatime) */",
]


@migrations()
def m008_atime(db: Database) -> None:
    for statement in _M008:
        db.execute(statement)


# The web view (cafs ui) at a million artifacts: a run's timeline of publishes is one range scan
# of (path, created_ns) that never reads the table; what gc would reclaim starts from the blobs
# no live artifact holds, usually few, without a scan of every blob.
_M009 = [
    "CREATE INDEX versions_path_time ON versions(path, created_ns)",
    "CREATE INDEX blobs_unreferenced ON blobs(id) WHERE refcount = 0",
]


@migrations()
def m009_ui_indexes(db: Database) -> None:
    for statement in _M009:
        db.execute(statement)


# Records leave out, for each reader, the directories they may not list (cafs.visibility):
# finding them walks the directories below a record's directory through this index, never the
# files beside them (a layer of 200,000 artifacts in 10 directories: 10 index entries).
_M010 = [
    "CREATE INDEX nodes_subdirs ON nodes(parent_id) WHERE kind IN ('layer', 'dir')",
]


@migrations()
def m010_subdirs(db: Database) -> None:
    for statement in _M010:
        db.execute(statement)


def migrate(db: Database) -> None:
    migrations.apply(db)
