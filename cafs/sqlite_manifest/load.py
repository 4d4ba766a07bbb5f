"""The import part of the SQLite manifest: whole trees written in one transaction.

Owns: add_tree (an imported run: its directories, artifacts with their histories, tags and
seal) and bulk_load_layer (many artifacts into a new layer at once, for generated stores), each
leaving the rows exactly as the same changes made one by one would: blob rows with the encoding
and stored size the blob store wrote, refcounts, nlink, and the aggregates. Must not check
names or bundles (cafs.bundle and cafs.rules do) or write blob files (they are stored before).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable

from cafs import schema
from cafs.errors import AlreadyExists
from cafs.lru import Lru
from cafs.manifest_api import BulkArtifact
from cafs.model import RUNS_INODE, Kind, StoredBlob, TreeEntry, Version
from cafs.sqlite_manifest.columns import (
    HELD,
    INSERT_IMPORTED_HISTORY,
    INSERT_IMPORTED_NODE,
    INSERT_IMPORTED_VERSION,
    INSERT_NODE,
    INSERT_TAG,
    INSERT_VERSION,
    UPSERT_BLOB,
    node_values,
    version_values,
)
from cafs.sqlite_manifest.rows import Rows

# Directories of an import whose ids are kept at hand (entries come parents first, mostly depth
# first); one further away is looked up again.
_DIRS_KEPT = 4096


class SqliteImport(Rows):
    def add_tree(self, name: str, top: TreeEntry,
                 entries: Iterable[tuple[TreeEntry, Iterable[Version]]],
                 blobs: Iterable[StoredBlob], sealed: tuple[int, str] | None,
                 now_ns: int) -> int:
        """Create runs/<name> with everything below it, histories and tags: one transaction,
        the rows streamed in as the iterables yield them, a batch at a time (nothing is held
        per entry, so a run of any size costs the same memory). `entries`: every directory
        before what it holds, each artifact with its versions oldest first (the last is
        current; their paths absolute); `blobs`: every content the versions use (already in
        the blob store)."""
        with self._transaction() as db:
            if self._child_id(RUNS_INODE, name) is not None:
                raise AlreadyExists(f"runs/{name} already exists")
            db.executemany(UPSERT_BLOB, ({
                "sha256": stored.digest, "size": stored.size, "stored_size": stored.stored_size,
                "encoding": stored.encoding, "refcount": 0, "created_ns": now_ns,
                "fresh": stored.fresh} for stored in blobs))
            # Each artifact gets a new path history, numbered 1..n in the bundle's order, unless
            # one is parked at its path (an execution of this name was removed): that one is
            # continued, as a publish there would. Looked up per artifact only if some history
            # is parked below the new execution at all (usually none: one indexed probe).
            prefix = f"runs/{name}/"
            rows = _TreeRows(db, self._parked_at if self._parked_below(prefix) else None,
                             self._last_node_id())
            top_id = rows.directory(RUNS_INODE, name, top)
            rows.flush()
            if sealed is not None:
                db.execute("UPDATE nodes SET sealed_ns = ?, root_sha256 = ? WHERE id = ?",
                           (*sealed, top_id))
            # Entries come parents first, mostly depth first: the directories recently made
            # are the ones asked for; an older one is looked up again (after a flush).
            dirs: Lru[str, int] = Lru(_DIRS_KEPT)
            dirs.put("", top_id)
            for entry, versions in entries:
                parent_rel, _, leaf = entry.rel.rpartition("/")
                parent_id = dirs.get(parent_rel)
                if parent_id is None:
                    rows.flush()
                    parent_id = self._dir_below(top_id, parent_rel)
                if entry.kind.has_versions:  # a file, or a symlink (its versions: targets)
                    rows.file(parent_id, leaf, entry, versions, prefix + entry.rel)
                elif entry.kind.is_dir:
                    dirs.put(entry.rel, rows.directory(parent_id, leaf, entry))
                else:  # a kind of node this import does not know how to write
                    raise ValueError(f"{entry.rel}: cannot import a {entry.kind.value}")
            rows.flush()
            schema.recompute_aggregates(db, top_id)
        return top_id

    def bulk_load_layer(self, execution: str, layer: str, artifacts: list[BulkArtifact], *,
                        mode: int, uid: int, gid: int, now_ns: int) -> int:
        """Create runs/<execution>/<layer> (and the execution if new; both directories get
        `mode`) holding `artifacts`, each with one version published now, all owned by
        uid:gid: one transaction, O(artifacts) in a few statements. Every blob must already
        be in the blob store, as `BulkArtifact.blob` describes it. Returns the layer's node
        id."""
        with self._transaction() as db:
            execution_id = self._child_id(RUNS_INODE, execution)
            if execution_id is None:
                execution_id = self._insert_node(RUNS_INODE, execution, Kind.EXECUTION,
                                                 mode=mode, uid=uid, gid=gid, mtime_ns=now_ns,
                                                 ctime_ns=now_ns)
            elif self._child_id(execution_id, layer) is not None:
                raise AlreadyExists(f"runs/{execution}/{layer} already exists")
            layer_id = self._insert_node(execution_id, layer, Kind.LAYER, mode=mode, uid=uid,
                                         gid=gid, mtime_ns=now_ns, ctime_ns=now_ns)
            self._touch(execution_id, now_ns)
            db.executemany(INSERT_NODE, (
                node_values(layer_id, artifact.name, Kind.FILE, mode=artifact.mode, uid=uid,
                            gid=gid, mtime_ns=now_ns, ctime_ns=now_ns)
                for artifact in artifacts))
            node_ids = dict(db.execute(
                "SELECT name, id FROM nodes WHERE parent_id = ?", (layer_id,)).fetchall())
            # Each distinct content once, with as many references as artifacts hold it.
            uses = Counter(artifact.blob.digest for artifact in artifacts)
            stored = {artifact.blob.digest: artifact.blob for artifact in artifacts}
            blob_ids = {digest: self._upsert_blob(blob, now_ns, references=uses[digest])
                        for digest, blob in stored.items()}
            prefix = f"runs/{execution}/{layer}/"
            db.executemany(INSERT_VERSION, (
                version_values(node_id=node_ids[artifact.name], path=prefix + artifact.name,
                               blob_id=blob_ids[artifact.blob.digest], size=artifact.blob.size,
                               mode=artifact.mode, uid=uid, gid=gid, mtime_ns=now_ns,
                               ctime_ns=now_ns, content_type=artifact.content_type,
                               created_ns=now_ns)
                for artifact in artifacts))
            db.execute("UPDATE nodes SET version_id = (SELECT max(v.id) FROM versions v "
                       "WHERE v.node_id = nodes.id) WHERE parent_id = ?", (layer_id,))
            # A history of one version each (schema m007), ids after the newest history.
            base = db.execute("SELECT coalesce(max(id), 0) FROM histories").fetchone()[0]
            db.execute("UPDATE nodes SET history_id = r.history FROM (SELECT id, ? + row_number() "
                       "OVER (ORDER BY id) AS history FROM nodes WHERE parent_id = ?) r "
                       "WHERE nodes.id = r.id", (base, layer_id))
            db.execute("INSERT INTO histories (id, last_number) SELECT history_id, 1 FROM nodes "
                       "WHERE parent_id = ?", (layer_id,))
            db.execute("UPDATE versions SET history_id = n.history_id, number = 1 FROM nodes n "
                       "WHERE n.parent_id = ? AND versions.node_id = n.id", (layer_id,))
            schema.recompute_aggregates(db, layer_id)
            found = self._aggregates_of(layer_id)
            assert found is not None
            self._aggregate_added(execution_id, found[1])
        return layer_id

    # -- inside the transaction -----------------------------------------------------------

    def _child_id(self, parent_id: int, name: str) -> int | None:
        row = self._db.execute("SELECT id FROM nodes WHERE parent_id = ? AND name = ?",
                               (parent_id, name)).fetchone()
        return None if row is None else int(row[0])

    def _dir_below(self, top_id: int, rel: str) -> int:
        """The id of the directory at `rel` below `top_id` (made earlier in this transaction)."""
        node_id: int | None = top_id
        for name in rel.split("/"):
            assert node_id is not None
            node_id = self._child_id(node_id, name)
        assert node_id is not None, f"{rel}: its directory was not made before it"
        return node_id

    def _parked_below(self, prefix: str) -> bool:
        """Whether a history no live artifact holds has its home below `prefix` (as
        _parked_at finds them: a recorded home, else its newest version's path): range scans
        of the indexes on histories.path and versions.path."""
        low, high = prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return self._db.execute(
            f"""
            SELECT 1 FROM histories h WHERE h.path >= :low AND h.path < :high AND NOT {HELD}
            UNION ALL
            SELECT 1 FROM versions v JOIN histories h ON h.id = v.history_id
            WHERE v.path >= :low AND v.path < :high AND v.number = h.last_number
              AND h.path IS NULL AND NOT {HELD}
            LIMIT 1
            """,
            {"low": low, "high": high},
        ).fetchone() is not None


class _TreeRows:
    """The rows of an imported tree, inserted a batch at a time with executemany. Node, version
    and history ids are assigned here as SQLite would (after the largest node id ever used:
    nodes are AUTOINCREMENT; after the largest version and history ids), so no row needs
    anything back from SQLite before its batch. Safe because the whole import is one
    transaction on the one connection.

    `parked_at` (None when no history is parked below the execution) finds the parked history
    an artifact's path continues. Seeing only flushed rows is enough: it must never return a
    history this import gave an artifact already, and it cannot: a new history's row is
    flushed with the node that holds it (so it is held, never parked), and a continued one was
    found by its home, the path of the artifact that took it (no other artifact has that
    path)."""

    BATCH = 4096

    def __init__(self, db: sqlite3.Connection,
                 parked_at: Callable[[str], int | None] | None, last_node_id: int) -> None:
        self._db = db
        self._parked_at = parked_at
        self._next_node = last_node_id + 1
        self._next_version = db.execute(
            "SELECT coalesce(max(id), 0) FROM versions").fetchone()[0] + 1
        self._next_history = db.execute(
            "SELECT coalesce(max(id), 0) FROM histories").fetchone()[0] + 1
        self._nodes: list[dict[str, object]] = []
        self._versions: list[dict[str, object]] = []
        self._histories: list[dict[str, object]] = []
        self._tags: list[dict[str, object]] = []
        self._subdirs: Counter[int] = Counter()  # parent id -> directories made in it
        self._refs: Counter[str] = Counter()  # digest -> artifacts it is now current for

    def directory(self, parent_id: int, name: str, entry: TreeEntry) -> int:
        node_id = self._take_node_id()
        self._add_node(node_id, parent_id, name, entry, None, None)
        self._subdirs[parent_id] += 1
        return node_id

    def file(self, parent_id: int, name: str, entry: TreeEntry, versions: Iterable[Version],
             path: str) -> int:
        """An artifact at `path` and its versions, oldest first: the last one is current and
        holds a reference. They are the newest of its path history, numbered in that order."""
        node_id, version_id, digest = self._take_node_id(), None, None
        parked = None if self._parked_at is None else self._parked_at(path)
        if parked is None:
            history, number = self._next_history, 0
            self._next_history += 1
        else:
            history, number = parked, self._db.execute(
                "SELECT last_number FROM histories WHERE id = ?", (parked,)).fetchone()[0]
        for version in versions:
            version_id, digest = self._next_version, version.digest
            self._next_version += 1
            number += 1
            self._versions.append({
                **version_values(node_id=node_id, path=version.path, blob_id=0,
                                 size=version.size, mode=version.mode, uid=version.uid,
                                 gid=version.gid, mtime_ns=version.mtime_ns,
                                 ctime_ns=version.ctime_ns, content_type=version.content_type,
                                 created_ns=version.created_ns,
                                 replaced_ns=version.replaced_ns, history_id=history,
                                 number=number),
                "id": version_id, "sha256": version.digest})
            if len(self._versions) >= self.BATCH:  # a long history: no more held at once
                self.flush()
        if digest is None:
            raise ValueError(f"{entry.rel}: an artifact without a version")
        self._refs[digest] += 1
        if parked is None:
            self._histories.append({"id": history, "last_number": number})
        else:  # continued: its newest version is now this artifact's (as _history_to_publish)
            self._db.execute("UPDATE histories SET last_number = ?, path = NULL WHERE id = ?",
                             (number, history))
        self._add_node(node_id, parent_id, name, entry, version_id, history)
        return node_id

    def _take_node_id(self) -> int:
        self._next_node += 1
        return self._next_node - 1

    def _add_node(self, node_id: int, parent_id: int, name: str, entry: TreeEntry,
                  version_id: int | None, history_id: int | None) -> None:
        self._nodes.append({
            **node_values(parent_id, name, entry.kind, mode=entry.mode, uid=entry.uid,
                          gid=entry.gid, mtime_ns=entry.mtime_ns, ctime_ns=entry.ctime_ns),
            "id": node_id, "version_id": version_id, "history_id": history_id})
        self._tags += [{"node_id": node_id, "name": tag, "value": value}
                       for tag, value in entry.tags.items()]
        if len(self._nodes) + len(self._versions) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        db = self._db
        db.executemany(INSERT_IMPORTED_NODE, self._nodes)
        db.executemany(INSERT_IMPORTED_VERSION, self._versions)
        db.executemany(INSERT_IMPORTED_HISTORY, self._histories)
        db.executemany(INSERT_TAG, self._tags)
        db.executemany("UPDATE nodes SET nlink = nlink + ? WHERE id = ?",
                       [(count, node_id) for node_id, count in self._subdirs.items()])
        db.executemany("UPDATE blobs SET refcount = refcount + ? WHERE sha256 = ?",
                       [(count, digest) for digest, count in self._refs.items()])
        for pending in (self._nodes, self._versions, self._histories, self._tags):
            pending.clear()
        self._subdirs.clear()
        self._refs.clear()
