"""The PostgreSQL manifest's schema and its migrations.

Owns: the tables, indexes and views of a manifest on PostgreSQL, with the same columns and the
same meaning as the SQLite manifest's (cafs/schema.py, after all of its migrations: this
schema starts at today's final shape), every integer BIGINT, every column documented by
COMMENT ON (`\\d+ nodes` in psql shows them), and its own numbered migrations recorded in
cafs_migrations. Must not hold the manifest's queries.

Differences, each because PostgreSQL needs it: ids are identity columns (nodes start at 16, as
SQLite's AUTOINCREMENT counter does, and never go back); names and paths are COLLATE "C" (byte
order, as SQLite compares them: listings and range scans over paths agree on both); tags are
indexed by name only (a value of up to 64 KiB does not fit a B-tree entry).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cafs.model import FIRST_NODE_ID

COMMENTS: dict[tuple[str, str | None], str] = {
    ('blobs', None):
        'one row per distinct content in blobs/',
    ('blobs', 'id'):
        'stable id; blobs/<sha256> in the mount is inode 2^48 + id',
    ('blobs', 'sha256'):
        '64 lowercase hex: SHA-256 of the UNCOMPRESSED bytes; the file is blobs/<sha256[0:2]>/<sha256>',
    ('blobs', 'size'):
        'uncompressed bytes',
    ('blobs', 'stored_size'):
        'bytes of the blob file on disk',
    ('blobs', 'encoding'):
        'raw+xxh64: the bytes, then XXH64 per 64 KiB block and a footer; zstd: seekable format (independent frames of <= 1 MiB, each with a checksum, + seek table); raw: the bytes alone (blobs stored before raw+xxh64)',
    ('blobs', 'refcount'):
        'live artifacts whose current version is this content; 0 = only history (or nothing) holds it',
    ('blobs', 'created_ns'):
        'when this content was first stored (ns since the epoch)',
    ('nodes', None):
        'the live namespace under runs/: one row per directory or artifact',
    ('nodes', 'id'):
        'the inode number; AUTOINCREMENT so a number is never reused',
    ('nodes', 'parent_id'):
        'nodes.id of the parent directory; 2 (runs/) for executions',
    ('nodes', 'name'):
        "one path component: UTF-8, 1..255 bytes, no '/' or NUL",
    ('nodes', 'kind'):
        "execution = runs/<exec>, layer = runs/<exec>/<layer>, dir = sub-directory inside a layer, file = artifact, symlink = symbolic link inside a layer (its versions' blobs hold the target bytes; mode is always 0777)",
    ('nodes', 'mode'):
        'permission bits (no file type bits; no setuid/setgid)',
    ('nodes', 'uid'):
        'owner: the creator, or as set by chown',
    ('nodes', 'gid'):
        'group owner',
    ('nodes', 'mtime_ns'):
        'modification time (ns), settable with touch',
    ('nodes', 'ctime_ns'):
        'status change time (ns)',
    ('nodes', 'nlink'):
        'files: 1; directories: 2 + number of sub-directories',
    ('nodes', 'version_id'):
        'files: versions.id of the current content; NULL for directories, and for a file whose first write is still open (such rows are removed at start-up)',
    ('versions', None):
        "one row per publish of an artifact's content; history stays until gc",
    ('versions', 'id'):
        'version id; increases with every publish',
    ('versions', 'node_id'):
        'nodes.id of the artifact it was published to (that node may since be deleted)',
    ('versions', 'path'):
        "the artifact's path at publish time, relative to the mount: runs/<exec>/<layer>/...",
    ('versions', 'blob_id'):
        'the content',
    ('versions', 'size'):
        'uncompressed bytes (= blobs.size)',
    ('versions', 'mode'):
        'permission bits at publish',
    ('versions', 'uid'):
        "the writer's uid",
    ('versions', 'gid'):
        "the writer's gid",
    ('versions', 'mtime_ns'):
        'modification time at publish (ns)',
    ('versions', 'ctime_ns'):
        'status change time at publish (ns)',
    ('versions', 'content_type'):
        'MIME type guessed from the name, NULL if unknown',
    ('versions', 'created_ns'):
        'when this version was published (ns)',
    ('versions', 'replaced_ns'):
        'when a newer version, an unlink or a rename over it replaced it; NULL while current',
    ('tags', None):
        'user xattrs (user.* other than user.cafs.*) on artifacts and directories',
    ('tags', 'node_id'):
        'nodes.id the tag is on',
    ('tags', 'name'):
        "full xattr name, e.g. 'user.stage'",
    ('tags', 'value'):
        'the xattr value, bytes as given (at most 64 KiB, enforced by the kernel)',
    ('store_state', None):
        'one row: the manifest as a whole',
    ('store_state', 'id'):
        'always 1',
    ('store_state', 'synced_ns'):
        'when a commit with synchronous=FULL last made every earlier commit durable against power loss (an fsync through the mount)',
    ('store_state', 'checked_ns'):
        'when a daemon last started on this manifest after checking it (and its WAL) intact: orphan blob files older than this are what a crash left; newer ones, with no commit after them, may hold artifacts whose rows were lost',
    ('histories', None):
        'one row per path history: the versions one path has held',
    ('histories', 'id'):
        'history id (nodes.history_id, versions.history_id); held while a node has it, else parked',
    ('histories', 'path'):
        "its home path (runs/<exec>/<layer>/...) where that differs from its newest version's path (NULL: that path): set when its artifact moved there by a rename, or was removed there after its directory moved; where it is parked",
    ('histories', 'last_number'):
        'the number its newest version got: the next gets last_number + 1; never decreases, so gc never renumbers and no number is given twice',
    ('blobs', 'damaged_ns'):
        'set by fsck --repair when the file is missing or its bytes do not hash to sha256: reads of artifacts holding it fail with EIO until the same content is written or imported again; NULL = sound',
    ('nodes', 'sealed_ns'):
        'executions: when cafs seal made the run immutable (every change inside it is EROFS); NULL = open',
    ('nodes', 'root_sha256'):
        "executions, once sealed: SHA-256 over the sorted lines '<path below the execution>\\0<sha256>\\n' of its artifacts",
    ('nodes', 'artifacts'):
        'files: 1 once published (version_id set), else 0; directories: the published artifacts below them, at any depth (= sum over the children)',
    ('nodes', 'logical_bytes'):
        'files: the size of the current version (0 before the first publish); directories: the sum over the children',
    ('nodes', 'first_write_ns'):
        'files: the oldest created_ns of the versions whose node_id is this node (history included, until gc drops it); directories: the minimum over the children; NULL when there is none',
    ('nodes', 'last_write_ns'):
        'as first_write_ns, the newest',
    ('nodes', 'history_id'):
        'files: histories.id of the path history this artifact continues; set at its first publish, or when it moves onto a path that has one; NULL for directories and for files never published',
    ('versions', 'history_id'):
        'histories.id of the path history this version belongs to; it moves with its artifact through renames',
    ('versions', 'number'):
        'its number in that history: 1..n in the order versions joined it; stable (gc removes rows, never renumbers)',
    ('nodes', 'atime_ns'):
        'access time (ns) as last set explicitly (touch -a, utimensat); NULL = never set, and stat shows mtime_ns. Reads never change it (the mount is noatime)',
}
COMMENTS[("nodes", "id")] = ("the inode number; an identity column whose sequence never goes "
                             "back, so a number is never reused")
COMMENTS[("store_state", "synced_ns")] = (
    "the durable point: every blob stored before it is on disk (a group sync or fsync through "
    "the mount); PostgreSQL commits are durable themselves (synchronous_commit on)")

_TABLES = f"""
CREATE TABLE blobs (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    sha256      TEXT   NOT NULL UNIQUE,
    size        BIGINT NOT NULL,
    stored_size BIGINT NOT NULL,
    encoding    TEXT   NOT NULL CHECK (encoding IN ('raw', 'raw+xxh64', 'zstd')),
    refcount    BIGINT NOT NULL DEFAULT 0 CHECK (refcount >= 0),
    created_ns  BIGINT NOT NULL,
    damaged_ns  BIGINT
);
CREATE TABLE nodes (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY (START WITH {FIRST_NODE_ID}) PRIMARY KEY,
    parent_id   BIGINT NOT NULL,
    name        TEXT COLLATE "C" NOT NULL,
    kind        TEXT   NOT NULL
                CHECK (kind IN ('execution', 'layer', 'dir', 'file', 'symlink')),
    mode        BIGINT NOT NULL,
    uid         BIGINT NOT NULL,
    gid         BIGINT NOT NULL,
    mtime_ns    BIGINT NOT NULL,
    ctime_ns    BIGINT NOT NULL,
    nlink       BIGINT NOT NULL DEFAULT 1,
    version_id  BIGINT,
    sealed_ns   BIGINT,
    root_sha256 TEXT,
    artifacts   BIGINT NOT NULL DEFAULT 0,
    logical_bytes BIGINT NOT NULL DEFAULT 0,
    first_write_ns BIGINT,
    last_write_ns BIGINT,
    history_id  BIGINT,
    atime_ns    BIGINT,
    UNIQUE (parent_id, name)
);
CREATE TABLE versions (
    id           BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    node_id      BIGINT NOT NULL,
    path         TEXT COLLATE "C" NOT NULL,
    blob_id      BIGINT NOT NULL REFERENCES blobs(id),
    size         BIGINT NOT NULL,
    mode         BIGINT NOT NULL,
    uid          BIGINT NOT NULL,
    gid          BIGINT NOT NULL,
    mtime_ns     BIGINT NOT NULL,
    ctime_ns     BIGINT NOT NULL,
    content_type TEXT,
    created_ns   BIGINT NOT NULL,
    replaced_ns  BIGINT,
    history_id   BIGINT,
    number       BIGINT
);
CREATE TABLE tags (
    node_id BIGINT NOT NULL,
    name    TEXT COLLATE "C" NOT NULL,
    value   BYTEA  NOT NULL,
    PRIMARY KEY (node_id, name)
);
CREATE TABLE store_state (
    id          BIGINT PRIMARY KEY CHECK (id = 1),
    synced_ns   BIGINT,
    checked_ns  BIGINT
);
INSERT INTO store_state (id) VALUES (1);
CREATE TABLE histories (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    path        TEXT COLLATE "C",
    last_number BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX versions_node ON versions(node_id);
CREATE INDEX versions_blob ON versions(blob_id);
CREATE INDEX nodes_unpublished ON nodes(id) WHERE kind = 'file' AND version_id IS NULL;
CREATE INDEX tags_name ON tags(name);
CREATE INDEX versions_path ON versions(path);
CREATE INDEX nodes_first_write ON nodes(parent_id, first_write_ns);
CREATE INDEX nodes_last_write ON nodes(parent_id, last_write_ns);
CREATE UNIQUE INDEX versions_history ON versions(history_id, number);
CREATE INDEX nodes_history ON nodes(history_id) WHERE history_id IS NOT NULL;
CREATE INDEX histories_path ON histories(path) WHERE path IS NOT NULL;
CREATE INDEX versions_path_time ON versions(path, created_ns);
CREATE INDEX blobs_unreferenced ON blobs(id) WHERE refcount = 0;
CREATE VIEW executions AS
SELECT id, name, uid, gid, mode, mtime_ns, ctime_ns FROM nodes WHERE kind = 'execution';
CREATE VIEW layers AS
SELECT l.id, e.name AS execution, l.name, l.uid, l.gid, l.mode, l.mtime_ns, l.ctime_ns
FROM nodes l JOIN nodes e ON e.id = l.parent_id WHERE l.kind = 'layer';
CREATE VIEW artifacts AS
WITH RECURSIVE paths(id, path, execution, layer) AS (
    SELECT id, 'runs/' || name, name, NULL::text COLLATE "C" FROM nodes WHERE parent_id = 2
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
WHERE n.kind = 'file';
"""

_VIEW_COMMENTS = {
    "executions": "executions: the directories runs/<exec>",
    "layers": "layers: the directories runs/<exec>/<layer>",
    "artifacts": "every live artifact with its path and current content",
}


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _comment_on(execute: Callable[[str], Any],
                comments: dict[tuple[str, str | None], str]) -> None:
    """COMMENT ON each table (column None) or column: `\\d+` in psql shows what it means."""
    for (table, column), comment in comments.items():
        target = f"TABLE {table}" if column is None else f"COLUMN {table}.{column}"
        execute(f"COMMENT ON {target} IS {_quote(comment)}")


def m001_initial(execute: Callable[[str], Any]) -> None:
    """Today's final shape of the SQLite schema (its m001..m009), with every comment."""
    execute(_TABLES)
    _comment_on(execute, COMMENTS)
    for view, comment in _VIEW_COMMENTS.items():
        execute(f"COMMENT ON VIEW {view} IS {_quote(comment)}")


_SHARED = """
CREATE TABLE cafs_store (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE cafs_sessions (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    host TEXT NOT NULL,
    mountpoint TEXT NOT NULL,
    pid BIGINT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    beat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""

SHARED_COMMENTS: dict[tuple[str, str | None], str] = {
    ("cafs_store", None): "facts about the store as a whole, the same for every host mounting it",
    ("cafs_store", "key"): "blobs: where the blobs live (s3://bucket/prefix, or blobs/ for a "
                           "store whose blobs are on one host's disk)",
    ("cafs_store", "value"): "the fact",
    ("cafs_sessions", None): "one row per mount serving this manifest, on any host; a row whose "
                             "beat_at is older than the session timeout belongs to a dead mount",
    ("cafs_sessions", "id"): "the session id; never reused",
    ("cafs_sessions", "host"): "the host name of the mounting machine",
    ("cafs_sessions", "mountpoint"): "where that host mounts the store",
    ("cafs_sessions", "pid"): "the daemon's process id on that host",
    ("cafs_sessions", "started_at"): "when the mount started (server clock)",
    ("cafs_sessions", "beat_at"): "the mount's last heartbeat (server clock)",
}


def m002_shared(execute: Callable[[str], Any]) -> None:
    """Several hosts on one manifest: where the blobs are (every host must agree) and the
    mounts serving it."""
    execute(_SHARED)
    _comment_on(execute, SHARED_COMMENTS)


_SESSIONS = """
CREATE TABLE cafs_unfinished (
    node_id BIGINT PRIMARY KEY REFERENCES nodes(id) ON DELETE CASCADE,
    session_id BIGINT NOT NULL REFERENCES cafs_sessions(id) ON DELETE CASCADE
);
CREATE INDEX cafs_unfinished_session ON cafs_unfinished(session_id);
CREATE INDEX cafs_sessions_beat ON cafs_sessions(beat_at);
CREATE FUNCTION cafs_published() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM cafs_unfinished WHERE node_id = NEW.id;
    RETURN NULL;
END $$;
CREATE TRIGGER nodes_published AFTER UPDATE OF version_id ON nodes FOR EACH ROW
    WHEN (OLD.version_id IS NULL AND NEW.version_id IS NOT NULL)
    EXECUTE FUNCTION cafs_published();
ALTER TABLE blobs ADD COLUMN unreferenced_ns BIGINT;
UPDATE blobs SET unreferenced_ns = (extract(epoch FROM now()) * 1e9)::bigint WHERE refcount = 0;
CREATE FUNCTION cafs_unreferenced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.refcount > 0 THEN
        NEW.unreferenced_ns := NULL;
    ELSIF TG_OP = 'INSERT' OR OLD.refcount > 0 OR NEW.unreferenced_ns IS NULL THEN
        NEW.unreferenced_ns := (extract(epoch FROM now()) * 1e9)::bigint;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER blobs_unreferenced BEFORE INSERT OR UPDATE OF refcount ON blobs
    FOR EACH ROW EXECUTE FUNCTION cafs_unreferenced();
"""

SESSIONS_COMMENTS: dict[tuple[str, str | None], str] = {
    ("cafs_unfinished", None): "files being created: a node row with no version yet, and the "
                               "session (mount) writing it; no other host shows or removes it "
                               "while that session lives. The row goes at the first publish "
                               "(trigger nodes_published), with the node, or with the session",
    ("cafs_unfinished", "node_id"): "nodes.id of the unpublished file",
    ("cafs_unfinished", "session_id"): "cafs_sessions.id of the mount creating it",
    ("blobs", "unreferenced_ns"): "when refcount last dropped to 0 (ns since the epoch, the "
                                  "server's clock; set by the trigger blobs_unreferenced): gc "
                                  "deletes the blob only once this is older than gc_grace. "
                                  "NULL while referenced",
}


def m003_sessions(execute: Callable[[str], Any]) -> None:
    """Sessions own their unfinished files; blobs remember when they lost their last
    reference (gc's grace period, on every host)."""
    execute(_SESSIONS)
    _comment_on(execute, SESSIONS_COMMENTS)


_WRITERS = """
CREATE TABLE cafs_writers (
    session_id BIGINT NOT NULL REFERENCES cafs_sessions(id) ON DELETE CASCADE,
    node_id BIGINT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    opened_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, node_id)
);
CREATE INDEX cafs_writers_node ON cafs_writers(node_id);
"""

WRITERS_COMMENTS: dict[tuple[str, str | None], str] = {
    ("cafs_writers", None): "files open for writing, on any host: one row per mount (session) "
                            "and file while that mount holds it open for writing. cafs seal "
                            "refuses a run holding one; a file row with no version and no "
                            "writer is an abandoned create",
    ("cafs_writers", "session_id"): "the mount writing it (cafs_sessions.id): its rows go with "
                                    "its session, so a dead host's writers vanish when its "
                                    "session is removed",
    ("cafs_writers", "node_id"): "the file (nodes.id); the row goes with the node (removed on "
                                 "another host: nothing of that write will be published)",
    ("cafs_writers", "opened_at"): "when this mount first opened it for writing (server clock)",
}


def m005_writers(execute: Callable[[str], Any]) -> None:
    """Writers on several hosts: the files each mount holds open for writing, seen by all."""
    execute(_WRITERS)
    _comment_on(execute, WRITERS_COMMENTS)


# One NOTIFY per transaction (PostgreSQL folds identical ones), its payload the writing mount's
# session: a mount wakes only for the others' changes.
_CHANGES = """
CREATE TABLE cafs_changes (
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    origin      BIGINT DEFAULT nullif(current_setting('cafs.session', true), '')::bigint,
    what        TEXT NOT NULL
                CHECK (what IN ('added', 'removed', 'changed', 'moved', 'tags', 'blob', 'damage')),
    id          BIGINT NOT NULL,
    parent_id   BIGINT,
    name        TEXT COLLATE "C",
    old_parent_id BIGINT,
    old_name    TEXT COLLATE "C"
);
CREATE INDEX cafs_changes_xid ON cafs_changes (xid);

CREATE FUNCTION cafs_changes_node() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO cafs_changes (what, id, parent_id, name)
        VALUES ('removed', OLD.id, OLD.parent_id, OLD.name);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO cafs_changes (what, id, parent_id, name)
        VALUES ('added', NEW.id, NEW.parent_id, NEW.name);
    ELSIF OLD.parent_id = NEW.parent_id AND OLD.name = NEW.name THEN
        INSERT INTO cafs_changes (what, id, parent_id, name)
        VALUES ('changed', NEW.id, NEW.parent_id, NEW.name);
    ELSE
        INSERT INTO cafs_changes (what, id, parent_id, name, old_parent_id, old_name)
        VALUES ('moved', NEW.id, NEW.parent_id, NEW.name, OLD.parent_id, OLD.name);
    END IF;
    PERFORM pg_notify('cafs_changes', coalesce(current_setting('cafs.session', true), ''));
    RETURN NULL;
END $$;

CREATE FUNCTION cafs_changes_tags() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cafs_changes (what, id)
    VALUES ('tags', CASE WHEN TG_OP = 'DELETE' THEN OLD.node_id ELSE NEW.node_id END);
    PERFORM pg_notify('cafs_changes', coalesce(current_setting('cafs.session', true), ''));
    RETURN NULL;
END $$;

CREATE FUNCTION cafs_changes_blob() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO cafs_changes (what, id, name) VALUES ('blob', OLD.id, OLD.sha256);
    ELSE
        INSERT INTO cafs_changes (what, id, name) VALUES ('damage', NEW.id, NEW.sha256);
    END IF;
    PERFORM pg_notify('cafs_changes', coalesce(current_setting('cafs.session', true), ''));
    RETURN NULL;
END $$;

CREATE TRIGGER cafs_changes_node_added_removed AFTER INSERT OR DELETE ON nodes
    FOR EACH ROW EXECUTE FUNCTION cafs_changes_node();
CREATE TRIGGER cafs_changes_node_changed AFTER UPDATE ON nodes FOR EACH ROW
    WHEN ((OLD.parent_id, OLD.name, OLD.mode, OLD.uid, OLD.gid, OLD.mtime_ns, OLD.ctime_ns,
           OLD.nlink, OLD.version_id, OLD.sealed_ns, OLD.root_sha256, OLD.atime_ns)
          IS DISTINCT FROM
          (NEW.parent_id, NEW.name, NEW.mode, NEW.uid, NEW.gid, NEW.mtime_ns, NEW.ctime_ns,
           NEW.nlink, NEW.version_id, NEW.sealed_ns, NEW.root_sha256, NEW.atime_ns))
    EXECUTE FUNCTION cafs_changes_node();
CREATE TRIGGER cafs_changes_tags_changed AFTER INSERT OR UPDATE OR DELETE ON tags
    FOR EACH ROW EXECUTE FUNCTION cafs_changes_tags();
CREATE TRIGGER cafs_changes_blob_removed AFTER DELETE ON blobs
    FOR EACH ROW EXECUTE FUNCTION cafs_changes_blob();
CREATE TRIGGER cafs_changes_blob_damage AFTER UPDATE ON blobs FOR EACH ROW
    WHEN (OLD.damaged_ns IS DISTINCT FROM NEW.damaged_ns)
    EXECUTE FUNCTION cafs_changes_blob();
"""

CHANGES_COMMENTS: dict[tuple[str, str | None], str] = {
    ("cafs_changes", None): "the change feed: one row per namespace row a transaction changed "
                            "(written by triggers on nodes, tags and blobs, each transaction "
                            "also NOTIFYing cafs_changes once); every mount follows it to drop "
                            "what it cached. Rows older than a few minutes are trimmed",
    ("cafs_changes", "xid"): "the writing transaction: a reader takes the rows of the "
                             "transactions its last snapshot did not see (commits land out of "
                             "order, so no counter would do)",
    ("cafs_changes", "origin"): "cafs_sessions.id of the mount that made the change (the "
                                "cafs.session setting of its connection); NULL: another client",
    ("cafs_changes", "what"): "added, removed, changed (its attributes or current version), "
                              "moved (renamed, or into another directory): a row of nodes "
                              "(id = nodes.id); tags: a node's user xattrs (id = nodes.id); "
                              "blob: a content removed (id = blobs.id, name = sha256); "
                              "damage: a content marked damaged or healed",
    ("cafs_changes", "id"): "the node or blob changed",
    ("cafs_changes", "parent_id"): "a node: its directory (after the change)",
    ("cafs_changes", "name"): "a node: its name (after the change); blob, damage: the sha256",
    ("cafs_changes", "old_parent_id"): "moved: the directory it left",
    ("cafs_changes", "old_name"): "moved: the name it left",
}


def m004_changes(execute: Callable[[str], Any]) -> None:
    """The change feed that keeps every mount's caches close-to-open (see
    cafs.pg_manifest.feed): triggers record what each transaction changed."""
    execute(_CHANGES)
    _comment_on(execute, CHANGES_COMMENTS)


def m006_subdirs(execute: Callable[[str], Any]) -> None:
    """The SQLite manifest's m010: the directories below a directory, without its files (what
    records leave out for a reader is found through it)."""
    execute("CREATE INDEX nodes_subdirs ON nodes(parent_id) WHERE kind IN ('layer', 'dir')")


# Numbered, applied in order, each once, each in the transaction that records it. Never edit
# an applied one: add the next.
MIGRATIONS: list[tuple[str, Callable[[Callable[[str], Any]], None]]] = [
    ("m001_initial", m001_initial),
    ("m002_shared", m002_shared),
    ("m003_sessions", m003_sessions),
    ("m004_changes", m004_changes),
    ("m005_writers", m005_writers),
    ("m006_subdirs", m006_subdirs),
]

NAMES = [name for name, _ in MIGRATIONS]
