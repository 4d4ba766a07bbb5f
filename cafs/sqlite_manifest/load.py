"""The import part of the SQLite manifest: whole trees written in one transaction.

Owns: add_tree (an imported run: its directories, artifacts with their histories, tags and
seal) and bulk_load_layer (many artifacts into a new layer at once, for generated stores), each
leaving the rows exactly as the same changes made one by one would: blob rows with the encoding
and stored size the blob store wrote, refcounts, nlink, and the aggregates. Must not check
names or bundles (cafs.bundle and cafs.rules do) or write blob files (they are stored before).
"""

from __future__ import annotations

from collections import Counter

from cafs import schema
from cafs.errors import AlreadyExists
from cafs.manifest_api import BulkArtifact
from cafs.model import RUNS_INODE, Kind, StoredBlob, TreeEntry
from cafs.sqlite_manifest.columns import INSERT_NODE, INSERT_VERSION, node_values, version_values
from cafs.sqlite_manifest.rows import Rows


class SqliteImport(Rows):
    def add_tree(self, name: str, top: TreeEntry, entries: list[TreeEntry],
                 blobs: dict[str, StoredBlob], sealed: tuple[int, str] | None,
                 now_ns: int) -> int:
        """Create runs/<name> with everything below it, histories and tags: one transaction.
        `blobs` holds every digest the versions use (already in the blob store)."""
        with self._transaction() as db:
            if self._child_id(RUNS_INODE, name) is not None:
                raise AlreadyExists(f"runs/{name} already exists")
            blob_ids = {digest: self._upsert_blob(stored, now_ns, references=0)
                        for digest, stored in blobs.items()}
            ids = {"": self._insert_entry(RUNS_INODE, name, Kind.EXECUTION, top)}
            if sealed is not None:
                db.execute("UPDATE nodes SET sealed_ns = ?, root_sha256 = ? WHERE id = ?",
                           (*sealed, ids[""]))
            self._insert_tags(ids[""], top.tags)
            for entry in sorted(entries, key=lambda e: e.rel.count("/")):
                parent_rel, _, leaf = entry.rel.rpartition("/")
                node_id = self._insert_entry(ids[parent_rel], leaf, entry.kind, entry)
                ids[entry.rel] = node_id
                self._insert_tags(node_id, entry.tags)
                if entry.kind.has_versions:
                    self._insert_history(node_id, f"runs/{name}/{entry.rel}", entry, blob_ids)
            schema.recompute_aggregates(db, ids[""])
        return ids[""]

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

    def _insert_entry(self, parent_id: int, name: str, kind: Kind, entry: TreeEntry) -> int:
        return self._insert_node(parent_id, name, kind, mode=entry.mode, uid=entry.uid,
                                 gid=entry.gid, mtime_ns=entry.mtime_ns, ctime_ns=entry.ctime_ns)

    def _insert_history(self, node_id: int, path: str, entry: TreeEntry,
                        blob_ids: dict[str, int]) -> None:
        """A file's versions, oldest first: the last one is current and holds a reference."""
        version_id = None
        for version in entry.versions:
            version_id = self._db.execute(INSERT_VERSION, version_values(
                node_id=node_id, path=version.path or path, blob_id=blob_ids[version.digest],
                size=version.size, mode=version.mode, uid=version.uid, gid=version.gid,
                mtime_ns=version.mtime_ns, ctime_ns=version.ctime_ns,
                content_type=version.content_type, created_ns=version.created_ns,
                replaced_ns=version.replaced_ns)).lastrowid
        current = entry.versions[-1]
        self._db.execute("UPDATE nodes SET version_id = ? WHERE id = ?", (version_id, node_id))
        self._db.execute("UPDATE blobs SET refcount = refcount + 1 WHERE id = ?",
                         (blob_ids[current.digest],))
