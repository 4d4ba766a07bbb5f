"""A bundle's scratch index: the entries, versions and blobs of one export or import in a
private SQLite file, so that neither holds a run in memory. What they allocate stays the same
whatever the run's size; this file grows with it instead (on the store's disk).

Owns: the scratch file — made in the store's tmp/ (0600, which start-up empties, so a crash
leaves nothing behind), removed when closed — and every question the bundle code asks across
records: is this path's directory there, is a path or a blob listed twice, is every version's
content listed with its size, is every listed blob used, which blobs the store already has and
which this import stored. Must not know the bundle's byte format, the manifest or FUSE. It is
never the manifest: nothing of a bundle being read is visible to anyone until the import's one
manifest transaction. Like the manifest, it lets no sqlite3 error out: each becomes a CafsError
with an errno (ENOSPC when tmp/'s disk is full), so callers catch one kind of error.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from cafs.digest import Digest
from cafs.errors import CafsError, translating
from cafs.model import BlobRef, Kind, StoredBlob, TreeEntry, Version

# The scratch file's page cache: what the index itself may hold in memory.
CACHE_KIB = 16 << 10
PAGE = 1000

_SCHEMA = """
CREATE TABLE entries (                     -- layers, directories and artifacts below the execution
    rel      TEXT PRIMARY KEY,             -- path below the execution (its order: UTF-8 bytes)
    kind     TEXT NOT NULL,                -- a Kind value: layer, dir, file, symlink (artifacts:
                                           -- file and symlink, whose versions are its targets)
    mode     INTEGER NOT NULL,
    uid      INTEGER NOT NULL,
    gid      INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    tagged   INTEGER NOT NULL              -- 1 if `tags` holds rows for it
) WITHOUT ROWID;
CREATE TABLE tags (
    rel   TEXT NOT NULL,
    name  TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (rel, name)
) WITHOUT ROWID;
CREATE TABLE versions (                    -- an artifact's history, oldest first
    rel          TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    path         TEXT NOT NULL,            -- where published, below the execution ('' = rel)
    sha256       TEXT NOT NULL,
    size         INTEGER NOT NULL,
    mode         INTEGER NOT NULL,
    uid          INTEGER NOT NULL,
    gid          INTEGER NOT NULL,
    mtime_ns     INTEGER NOT NULL,
    ctime_ns     INTEGER NOT NULL,
    content_type TEXT,
    created_ns   INTEGER NOT NULL,
    replaced_ns  INTEGER,
    PRIMARY KEY (rel, seq)
) WITHOUT ROWID;
CREATE TABLE blobs (                       -- every content the versions use, listed once
    sha256      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    state       INTEGER NOT NULL DEFAULT 0, -- 0 wanted, 1 the store has it, 2 stored here
    seen        INTEGER NOT NULL DEFAULT 0, -- 1 once its member was read
    stored_size INTEGER,                   -- states 1 and 2 (and export): as stored
    encoding    TEXT,
    healed      INTEGER,                   -- manifest id of a damaged blob written again
    target      INTEGER NOT NULL DEFAULT 0 -- 1 if a symlink's version uses it (mark_targets):
                                           -- its bytes must be a target symlink(2) takes
) WITHOUT ROWID;
"""

_WANTED, _PRESENT, _STORED = 0, 1, 2
# The kinds of entries whose versions are content (Kind.has_versions), as SQL.
_ARTIFACT_KINDS = "('file', 'symlink')"
_VERSION_COLUMNS = ("path, sha256, size, mode, uid, gid, mtime_ns, ctime_ns, content_type, "
                    "created_ns, replaced_ns")


class BundleIndex:
    """One scratch index. Used by one thread at a time (the import hands it from the event
    loop to a worker thread and back, never both at once)."""

    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self.path = path
        self._db = db

    @classmethod
    def create(cls, directory: Path) -> BundleIndex:
        path = directory / f"bundle-{os.getpid()}-{os.urandom(6).hex()}.sqlite"
        # Made 0600 without following a planted link before SQLite opens it.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600))
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # Scratch: no journal, no fsync; a crash loses it, and start-up removes it anyway.
            for pragma in ("journal_mode = OFF", "synchronous = OFF", "locking_mode = EXCLUSIVE",
                           f"cache_size = -{CACHE_KIB}", "temp_store = FILE"):
                db.execute(f"PRAGMA {pragma}")
            db.executescript(_SCHEMA)
            db.execute("BEGIN")
        except sqlite3.Error as exc:
            path.unlink(missing_ok=True)
            raise scratch_error(exc) from exc
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return cls(path, db)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> BundleIndex:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- entries and versions -------------------------------------------------------------

    def kind_of(self, rel: str) -> Kind | None:
        row = self._db.execute("SELECT kind FROM entries WHERE rel = ?", (rel,)).fetchone()
        return Kind(row[0]) if row else None

    def add_entry(self, entry: TreeEntry) -> bool:
        """False if an entry with that path is already there."""
        try:
            self._db.execute(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.rel, entry.kind.value, entry.mode, entry.uid, entry.gid, entry.mtime_ns,
                 entry.ctime_ns, 1 if entry.tags else 0))
        except sqlite3.IntegrityError:
            return False
        if entry.tags:
            self._db.executemany("INSERT INTO tags VALUES (?, ?, ?)",
                                 [(entry.rel, name, value) for name, value in entry.tags.items()])
        return True

    def add_version(self, rel: str, seq: int, version: Version) -> None:
        """The artifact's versions in order (seq 0, 1, ...; the last is current).
        `version.path`: where it was published, below the execution ('' = at rel)."""
        self._db.execute(
            f"INSERT INTO versions (rel, seq, {_VERSION_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rel, seq, version.path, version.digest, version.size, version.mode, version.uid,
             version.gid, version.mtime_ns, version.ctime_ns, version.content_type,
             version.created_ns, version.replaced_ns))

    def counts(self) -> tuple[int, int, int]:
        """(artifacts, entries, blobs)."""
        artifacts, entries = self._db.execute(
            f"SELECT count(*) FILTER (WHERE kind IN {_ARTIFACT_KINDS}), count(*) FROM entries"
        ).fetchone()
        return artifacts, entries, self._db.execute("SELECT count(*) FROM blobs").fetchone()[0]

    def version_not_listed(self) -> tuple[str, str] | None:
        """(path, sha256) of a version whose content is not listed with its size."""
        row = self._db.execute(
            "SELECT v.rel, v.sha256 FROM versions v LEFT JOIN blobs b ON b.sha256 = v.sha256 "
            "WHERE b.size IS NOT v.size LIMIT 1").fetchone()
        return (row[0], row[1]) if row else None

    def blob_unused(self) -> str | None:
        """The first listed blob no version uses."""
        self._db.execute("CREATE INDEX IF NOT EXISTS versions_sha256 ON versions(sha256)")
        row = self._db.execute(
            "SELECT sha256 FROM blobs b WHERE NOT EXISTS "
            "(SELECT 1 FROM versions v WHERE v.sha256 = b.sha256) ORDER BY sha256 LIMIT 1"
        ).fetchone()
        return row[0] if row else None

    def artifacts(self) -> Iterator[tuple[str, str, Kind]]:
        """(path, current sha256, kind) of every artifact, in UTF-8 byte order of the paths
        (what root_hash takes)."""
        for rel, digest, kind in self._db.execute(
                "SELECT e.rel, (SELECT sha256 FROM versions v WHERE v.rel = e.rel "
                "ORDER BY seq DESC LIMIT 1), e.kind FROM entries e "
                f"WHERE kind IN {_ARTIFACT_KINDS} ORDER BY e.rel"):
            yield rel, digest, Kind(kind)

    def entries(self, prefix: str) -> Iterator[tuple[TreeEntry, Iterator[Version]]]:
        """Every entry, parents first, each with its versions (oldest first) as they are read:
        their paths made absolute under `prefix` (runs/<name>/). Nothing else is held."""
        rows = self._db.execute(
            "SELECT rel, kind, mode, uid, gid, mtime_ns, ctime_ns, tagged FROM entries "
            "ORDER BY rel")
        for rel, kind, mode, uid, gid, mtime_ns, ctime_ns, tagged in rows:
            tags = {name: bytes(value) for name, value in self._db.execute(
                "SELECT name, value FROM tags WHERE rel = ? ORDER BY name", (rel,))} \
                if tagged else {}
            entry = TreeEntry(rel, Kind(kind), mode, uid, gid, mtime_ns, ctime_ns, tags)
            yield entry, self._versions(rel, prefix) if entry.kind.has_versions else iter(())

    def _versions(self, rel: str, prefix: str) -> Iterator[Version]:
        rows = self._db.execute(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE rel = ? ORDER BY seq", (rel,))
        for path, digest, *rest in rows:
            yield Version(0, 0, prefix + (path or rel), Digest(digest), *rest)

    # -- blobs ----------------------------------------------------------------------------

    def add_blob(self, digest: str, size: int) -> bool:
        """False if it is listed already."""
        try:
            self._db.execute("INSERT INTO blobs (sha256, size) VALUES (?, ?)", (digest, size))
        except sqlite3.IntegrityError:
            return False
        return True

    def mark_targets(self) -> None:
        """Flag the blobs a symlink's version uses (once every record is in): their bytes are
        checked as targets when their members stream past."""
        self._db.execute(
            "UPDATE blobs SET target = 1 WHERE sha256 IN (SELECT v.sha256 FROM versions v "
            "JOIN entries e ON e.rel = v.rel WHERE e.kind = 'symlink')")

    def symlink_using(self, digest: str) -> str | None:
        """The path of a symlink one of whose versions has this content (None if none)."""
        row = self._db.execute(
            "SELECT v.rel FROM versions v JOIN entries e ON e.rel = v.rel "
            "WHERE v.sha256 = ? AND e.kind = 'symlink' ORDER BY v.rel LIMIT 1",
            (digest,)).fetchone()
        return row[0] if row else None

    def blob_size(self, digest: str) -> int | None:
        row = self._db.execute("SELECT size FROM blobs WHERE sha256 = ?", (digest,)).fetchone()
        return row[0] if row else None

    def is_target(self, digest: str) -> bool:
        row = self._db.execute("SELECT target FROM blobs WHERE sha256 = ?", (digest,)).fetchone()
        return row is not None and row[0] == 1

    def mark_seen(self, digest: str) -> bool:
        """False if its member was read already."""
        return self._db.execute("UPDATE blobs SET seen = 1 WHERE sha256 = ? AND seen = 0",
                                (digest,)).rowcount == 1

    def first_unseen(self) -> str | None:
        row = self._db.execute(
            "SELECT sha256 FROM blobs WHERE seen = 0 ORDER BY sha256 LIMIT 1").fetchone()
        return row[0] if row else None

    def blob_page(self, after: str, limit: int = PAGE) -> list[tuple[str, int]]:
        """(sha256, size) of listed blobs after `after`, in digest order."""
        return self._db.execute(
            "SELECT sha256, size FROM blobs WHERE sha256 > ? ORDER BY sha256 LIMIT ?",
            (after, limit)).fetchall()

    def total_bytes(self) -> int:
        return int(self._db.execute("SELECT coalesce(sum(size), 0) FROM blobs").fetchone()[0])

    def store_has(self, blob: StoredBlob) -> None:
        """The store has this content, sound: nothing to write."""
        self._db.execute(
            "UPDATE blobs SET state = ?, stored_size = ?, encoding = ? WHERE sha256 = ?",
            (_PRESENT, blob.stored_size, blob.encoding, blob.digest))

    def store_damaged(self, digest: str, blob_id: int) -> None:
        """The store's copy is damaged: this import writes it again (and heals it)."""
        self._db.execute("UPDATE blobs SET healed = ? WHERE sha256 = ?", (blob_id, digest))

    def wanted(self, digest: str) -> bool:
        row = self._db.execute("SELECT state FROM blobs WHERE sha256 = ?", (digest,)).fetchone()
        return row is not None and row[0] == _WANTED

    def storing(self, digest: str) -> None:
        """Its file is about to be written: from now on a failed import's clean-up considers
        it (a removal of a file never written finds nothing)."""
        self._db.execute("UPDATE blobs SET state = ? WHERE sha256 = ?", (_STORED, digest))

    def stored(self, blob: StoredBlob) -> None:
        self._db.execute(
            "UPDATE blobs SET state = ?, stored_size = ?, encoding = ? WHERE sha256 = ?",
            (_STORED, blob.stored_size, blob.encoding, blob.digest))

    def count_state(self) -> tuple[int, int]:
        """(stored by this import, present before)."""
        rows = dict(self._db.execute(
            "SELECT state, count(*) FROM blobs GROUP BY state").fetchall())
        return rows.get(_STORED, 0), rows.get(_PRESENT, 0)

    def stored_pages(self, limit: int) -> Iterator[list[str]]:
        """The digests this import stored, `limit` at a time (for the clean-up of a failure)."""
        after = ""
        while page := [row[0] for row in self._db.execute(
                "SELECT sha256 FROM blobs WHERE state = ? AND sha256 > ? ORDER BY sha256 "
                "LIMIT ?", (_STORED, after, limit))]:
            yield page
            after = page[-1]

    def healed(self) -> list[int]:
        """Manifest ids of damaged blobs this import wrote again (as many as were damaged)."""
        return [row[0] for row in self._db.execute(
            "SELECT healed FROM blobs WHERE healed IS NOT NULL AND state = ?", (_STORED,))]

    def blobs_for_manifest(self) -> Iterator[StoredBlob]:
        """Every listed blob as it is in the store now (after store_blobs)."""
        for digest, size, stored_size, encoding, state in self._db.execute(
                "SELECT sha256, size, stored_size, encoding, state FROM blobs ORDER BY sha256"):
            yield StoredBlob(Digest(digest), size, stored_size, encoding,
                             fresh=state == _STORED)

    # -- export ---------------------------------------------------------------------------

    def add_export_blob(self, blob: BlobRef) -> None:
        self._db.execute("INSERT OR IGNORE INTO blobs (sha256, size, stored_size, encoding) "
                         "VALUES (?, ?, ?, ?)",
                         (blob.digest, blob.size, blob.stored_size, blob.encoding))

    def has_blob(self, digest: str) -> bool:
        return self._db.execute("SELECT 1 FROM blobs WHERE sha256 = ?",
                                (digest,)).fetchone() is not None

    def export_blobs(self) -> Iterator[BlobRef]:
        """Every blob added for export, in digest order."""
        for digest, size, stored_size, encoding in self._db.execute(
                "SELECT sha256, size, stored_size, encoding FROM blobs ORDER BY sha256"):
            yield BlobRef(0, Digest(digest), size, stored_size, encoding)


def scratch_error(exc: sqlite3.Error) -> CafsError:
    full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return CafsError(f"a bundle's scratch index in the store's tmp/: {exc}",
                     errno.ENOSPC if full else errno.EIO)


# Every sqlite3.Error becomes a CafsError.
_guarded = translating(sqlite3.Error, scratch_error)


for _name, _method in list(vars(BundleIndex).items()):
    if inspect.isfunction(_method) and not _name.startswith("__"):
        setattr(BundleIndex, _name, _guarded(_method))


__all__ = ["BundleIndex", "scratch_error"]
