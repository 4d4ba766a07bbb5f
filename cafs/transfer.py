"""Bundle transfer: a run out of the store as a bundle, and a bundle into the store.

Owns: what `cafs export` and `cafs import` do to a store (the bundle format itself is
cafs.bundle) and their typed results. Runs inside the daemon when the store is mounted, else in
the `cafs` command holding the store's lock (cafs.admin). Blob file I/O goes to worker threads;
manifest calls stay on the event loop's thread. Must not import trio, pyfuse3 or the daemon.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import IO, Any

from cafs.admin_context import AdminContext, JsonResult
from cafs.bundle import BundleReader, BundleWriter
from cafs.bundle_index import BundleIndex
from cafs.digest import Digest
from cafs.errors import AlreadyExists, CafsError, Damaged, InvalidArgument
from cafs.lifecycle import root_hash
from cafs.maintenance import DELETE_BATCH, delete_unreferenced_now
from cafs.model import MAX_SYMLINK_TARGET, RUNS_INODE, Kind, Node, StoredBlob, TreeEntry, Version
from cafs.rules import new_name


@dataclass(frozen=True)
class Exported(JsonResult):
    path: str
    artifacts: int
    blobs: int
    content_bytes: int
    root_sha256: str | None


@dataclass(frozen=True)
class Imported(JsonResult):
    path: str
    artifacts: int
    blobs_added: int
    blobs_present: int
    root_sha256: str | None


class Transfer(AdminContext):
    """export and import. Their bodies answer plain dicts; cafs.admin types them
    (Exported.from_json, Imported.from_json)."""

    async def export(self, out: IO[bytes], path: str) -> dict[str, Any]:
        manifest = self.manifest
        execution = self._execution(path)
        sealed = None
        if execution.sealed_ns is not None:
            sealed = (execution.sealed_ns, manifest.root_of(execution.ino) or "")
        now = time.time_ns()
        # The records go to spool files and a scratch index as the manifest is read, in one
        # pass with no await (the run as of one moment): memory stays the same, whatever the
        # run's size. The bundle is written from them afterwards, in a worker thread.
        writer = BundleWriter(self.blobs.tmp_dir, self.blobs.space, execution.name,
                              self._tree_entry("", execution, ()), sealed, now)
        try:
            for rel, node in manifest.subtree(execution.ino):
                if node.kind.has_versions and node.version_id is None:
                    continue  # its first write is still in progress
                history: tuple[Version, ...] = ()
                if node.kind.has_versions:
                    # The current version last (import takes the last as current): a version
                    # published here by an artifact since replaced by a rename can be newer.
                    found = manifest.history(node.ino, f"{path}/{rel}")
                    if node.kind is Kind.SYMLINK:  # `ln -sfn` renames a new link over the old
                        found = [v for v in found if self._is_target(v)]  # not a file's bytes
                    history = (*(v for v in found if v.version_id != node.version_id),
                               *(v for v in found if v.version_id == node.version_id))
                    damaged = [v for v in history if v.damaged]
                    if damaged:
                        raise Damaged(f"{path}/{rel}: content {damaged[0].digest} is damaged; "
                                      "cannot export it")
                writer.add(self._tree_entry(rel, node, history), manifest.blob)

            def progress(done: int, total: int) -> None:
                self.progress("exporting", done, total)

            size = await self.runtime.run_in_thread(writer.write, out, self.blobs, progress)
            return {"path": path, "artifacts": writer.artifacts, "blobs": writer.blobs,
                    "content_bytes": size, "root_sha256": sealed[1] if sealed else None}
        finally:
            writer.close()

    def _tree_entry(self, rel: str, node: Node, history: tuple[Version, ...]) -> TreeEntry:
        return TreeEntry(rel, node.kind, node.mode, node.uid, node.gid, node.mtime_ns,
                         node.ctime_ns, self.manifest.tags_of(node.ino), history)

    async def import_bundle(self, source: IO[bytes], name: str | None = None
                            ) -> dict[str, Any]:
        manifest = self.manifest
        # Everything of the bundle that spans records is staged in a scratch index on disk,
        # then streamed into one manifest transaction: memory stays the same whatever the
        # run's size, and nothing is visible before that transaction commits.
        index = BundleIndex.create(self.blobs.tmp_dir)
        try:
            reader = await self.runtime.run_in_thread(BundleReader, source, index,
                                                      self.blobs.space, self.max_artifact_size)
            run = reader.run
            name = run.name if name is None else name
            try:
                new_name(name.encode())
            except (UnicodeEncodeError, CafsError):
                raise InvalidArgument(f"{name!r} is not a valid execution name") from None
            if manifest.resolve(f"runs/{name}") is not None:
                raise AlreadyExists(f"runs/{name} already exists (choose another with --as)")
            if run.sealed is not None:
                root = await self.runtime.run_in_thread(
                    lambda: root_hash(index.artifacts(), presorted=True))
                if root != run.sealed[1]:
                    raise InvalidArgument("bundle is inconsistent: its artifacts do not give "
                                          "its recorded root hash")
            # Which contents the store has (sound), a page at a time between filesystem
            # requests: only an admin command (one runs at a time) removes blobs.
            after = ""
            while page := index.blob_page(after):
                for digest, _ in page:
                    blob = manifest.blob(Digest(digest))
                    if blob is not None and blob.damaged:
                        index.store_damaged(digest, blob.blob_id)
                    if blob is not None and not blob.damaged and self.blobs.has(blob.digest):
                        index.store_has(StoredBlob(blob.digest, blob.size, blob.stored_size,
                                                   blob.encoding, fresh=False))
                after = page[-1][0]
                await self.runtime.checkpoint()

            def progress(done: int, total: int) -> None:
                self.progress("importing", done, total)

            try:
                await self.runtime.run_in_thread(reader.store_blobs, self.blobs, progress)
                manifest.add_tree(name, run.top, index.entries(f"runs/{name}/"),
                                  index.blobs_for_manifest(), run.sealed, time.time_ns())
            except BaseException:
                # Only what nothing uses: while the blobs streamed in, artifacts written
                # through the mount may have come to hold the same content (a row names it
                # now), or be publishing it (pinned); and a blob the store had lost, written
                # again here, stays for the rows that name it.
                for stored in index.stored_pages(DELETE_BATCH):
                    self._delete_unreferenced_now(stored)
                raise
            self.live.nodes_changed([RUNS_INODE, *manifest.nodes_holding_blobs(index.healed())])
            added, present = index.count_state()
            return {"path": f"runs/{name}", "artifacts": index.counts()[0],
                    "blobs_added": added, "blobs_present": present,
                    "root_sha256": run.sealed[1] if run.sealed else None}
        finally:
            index.close()

    def _is_target(self, version: Version) -> bool:
        """Whether a version at a symlink's path can be one of its targets: the path's history
        also holds the content of a file the symlink replaced, which import would refuse as a
        target. At most 4095 bytes read."""
        if not 1 <= version.size <= MAX_SYMLINK_TARGET or version.damaged:
            return False
        blob = self.manifest.blob(version.digest)
        if blob is None:
            return False
        reader = self.blobs.open(blob.digest, blob.encoding)
        try:
            return b"\0" not in reader.read(0, version.size)
        finally:
            reader.close()

    def _delete_unreferenced_now(self, digests: list[str]) -> set[str]:
        return delete_unreferenced_now(self.store, self.live, digests)
