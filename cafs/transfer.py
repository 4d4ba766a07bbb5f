"""Bundle transfer: a run out of the store as a bundle, and a bundle into the store.

Owns: what `cafs export` and `cafs import` do to a store (the bundle format itself is
cafs.bundle) and their typed results. Runs inside the daemon when the store is mounted, else in
the `cafs` command holding the store's lock (cafs.admin). Blob file I/O goes to worker threads;
manifest calls stay on the event loop's thread. Must not import trio, pyfuse3 or the daemon.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import IO, Any

from cafs.admin_context import AdminContext, JsonResult
from cafs.bundle import BadBundle, BundleReader, encode_header, write_bundle
from cafs.digest import Digest
from cafs.errors import AlreadyExists, CafsError, Damaged, InvalidArgument
from cafs.lifecycle import root_hash
from cafs.maintenance import delete_unreferenced_now
from cafs.model import MAX_SYMLINK_TARGET, RUNS_INODE, Kind, Node, StoredBlob, TreeEntry, Version
from cafs.rules import check_target, new_name


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
        top = self._tree_entry("", execution, ())
        entries: list[TreeEntry] = []
        digests: set[str] = set()
        for rel, node in manifest.subtree(execution.ino):
            if node.kind.has_versions and node.version_id is None:
                continue  # its first write is still in progress
            history: tuple[Version, ...] = ()
            if node.kind.has_versions:
                # The current version last (import takes the last as current): a version
                # published here by an artifact since replaced by a rename can be newer.
                found = manifest.history(node.ino, f"{path}/{rel}")
                if node.kind is Kind.SYMLINK:  # `ln -sfn` renames a new link over the old
                    found = [v for v in found if self._is_target(v)]  # but not a file's bytes
                history = (*(v for v in found if v.version_id != node.version_id),
                           *(v for v in found if v.version_id == node.version_id))
                damaged = [v for v in history if v.damaged]
                if damaged:
                    raise Damaged(f"{path}/{rel}: content {damaged[0].digest} is damaged; "
                                  "cannot export it")
                digests.update(v.digest for v in history)
            entries.append(self._tree_entry(rel, node, history))
        blobs = [blob for digest in sorted(digests)
                 if (blob := manifest.blob(Digest(digest))) is not None]
        sealed = None
        if execution.sealed_ns is not None:
            sealed = (execution.sealed_ns, manifest.root_of(execution.ino) or "")
        now = time.time_ns()
        header = encode_header(execution.name, top, sealed, entries, blobs, now)

        def progress(done: int, total: int) -> None:
            self.progress("exporting", done, total)

        size = await self.runtime.run_in_thread(write_bundle, out, header, blobs, self.blobs,
                                                now, progress)
        return {"path": path, "artifacts": sum(e.kind.has_versions for e in entries),
                "blobs": len(blobs), "content_bytes": size,
                "root_sha256": sealed[1] if sealed else None}

    def _tree_entry(self, rel: str, node: Node, history: tuple[Version, ...]) -> TreeEntry:
        return TreeEntry(rel, node.kind, node.mode, node.uid, node.gid, node.mtime_ns,
                         node.ctime_ns, self.manifest.tags_of(node.ino), history)

    async def import_bundle(self, source: IO[bytes], name: str | None = None
                            ) -> dict[str, Any]:
        manifest = self.manifest
        reader = await self.runtime.run_in_thread(BundleReader, source, self.max_artifact_size)
        header = reader.header
        name = header.name if name is None else name
        try:
            new_name(name.encode())
        except (UnicodeEncodeError, CafsError):
            raise InvalidArgument(f"{name!r} is not a valid execution name") from None
        if manifest.resolve(f"runs/{name}") is not None:
            raise AlreadyExists(f"runs/{name} already exists (choose another with --as)")
        if header.sealed is not None:
            artifacts = [(e.rel, e.versions[-1].digest, e.kind) for e in header.entries
                         if e.kind.has_versions]
            if root_hash(artifacts) != header.sealed[1]:
                raise InvalidArgument("bundle is inconsistent: its artifacts do not give "
                                      "its recorded root hash")
        present: dict[str, StoredBlob] = {}
        healed: list[int] = []
        for digest in header.blobs:
            blob = manifest.blob(Digest(digest))
            if blob is not None and blob.damaged:
                healed.append(blob.blob_id)
            if blob is not None and not blob.damaged and self.blobs.has(blob.digest):
                present[digest] = StoredBlob(blob.digest, blob.size, blob.stored_size,
                                             blob.encoding, fresh=False)

        def progress(done: int, total: int) -> None:
            self.progress("importing", done, total)

        wanted = set(header.blobs) - present.keys()
        added: dict[str, StoredBlob] = {}
        entries = [replace(entry, versions=tuple(
            replace(v, path=f"runs/{name}/{v.path or entry.rel}") for v in entry.versions))
            for entry in header.entries]
        try:
            await self.runtime.run_in_thread(reader.store_blobs, wanted, self.blobs, progress,
                                             added)
            self._check_targets(entries, {**present, **added})
            manifest.add_tree(name, header.top, entries, {**present, **added}, header.sealed,
                              time.time_ns())
        except BaseException:
            # Only what nothing uses: while the blobs streamed in, artifacts written through
            # the mount may have come to hold the same content (a row names it now), or be
            # publishing it (pinned); and a blob the store had lost, written again here,
            # stays for the rows that name it.
            self._delete_unreferenced_now(list(added))
            raise
        self.live.nodes_changed([RUNS_INODE, *manifest.nodes_holding_blobs(healed)])
        return {"path": f"runs/{name}", "artifacts": sum(e.kind.has_versions for e in entries),
                "blobs_added": len(added), "blobs_present": len(present),
                "root_sha256": header.sealed[1] if header.sealed else None}

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

    def _check_targets(self, entries: list[TreeEntry], blobs: dict[str, StoredBlob]) -> None:
        """Symlink targets as symlink(2) would take them (their size was checked with the
        header; NUL only shows in the bytes). At most 4095 bytes each."""
        for entry in entries:
            if entry.kind is not Kind.SYMLINK:
                continue
            for version in entry.versions:
                stored = blobs[version.digest]
                reader = self.blobs.open(stored.digest, stored.encoding)
                try:
                    check_target(reader.read(0, version.size))
                except CafsError as exc:
                    raise BadBundle(f"{entry.rel}: {exc}") from None
                finally:
                    reader.close()

    def _delete_unreferenced_now(self, digests: list[str]) -> set[str]:
        return delete_unreferenced_now(self.store, self.live, digests)
