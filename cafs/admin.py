"""Life-cycle commands: history, sealing, queries, gc, repair, export and import.

Owns: what each admin command does to a store. The same code runs inside the daemon when the
store is mounted (requests arrive over the control socket, cafs.control) and inside the `cafs`
command when it is not (holding the store's lock), so a command never depends on where it runs
and never writes the manifest behind a running daemon's back.

Concurrency rule, inside the daemon: manifest calls run on the event loop's thread, between
filesystem requests, so each is atomic with respect to them; blob file I/O (hashing, export,
import) goes to worker threads. Deleting blob files happens in small batches on the loop
thread, each re-checking that no row and no write in flight (`Live.pinned_digests`) needs the
file, so gc never removes content a live artifact or a write about to publish uses.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import IO, Any, Protocol, TypeVar

from cafs import crashpoints
from cafs.blobstore import BlobStore
from cafs.bundle import BundleReader, encode_header, write_bundle
from cafs.digest import Digest, digest_of_chunks, is_digest
from cafs.errors import (
    AlreadyExists,
    Busy,
    CafsError,
    Damaged,
    InvalidArgument,
    NotFound,
    StoreError,
)
from cafs.manifest import Manifest, RepairPlan
from cafs.model import RUNS_INODE, BlobRef, Kind, Node, StoredBlob, TreeEntry, Version
from cafs.records import iso_time
from cafs.rules import DEFAULT_MAX_ARTIFACT_SIZE, new_name
from cafs.store import Store

T = TypeVar("T")
QUARANTINE_DIR = "quarantine"
DELETE_BATCH = 256
# Orphan blob files (no manifest row names them) are removed only once this old: a young one
# may be the only copy of an artifact whose manifest row was lost (a damaged WAL, a restored
# backup), and fsck lists those until then.
DEFAULT_ORPHAN_GRACE = 7 * 24 * 3600
CHECK_PAGE = 256


class Runtime(Protocol):
    async def run_in_thread(self, fn: Callable[..., T], *args: object) -> T: ...

    async def checkpoint(self) -> None: ...


class Live(Protocol):
    """What a running mount tells admin commands, and what they tell it (cafs.vfs.Vfs)."""

    def pinned_digests(self) -> set[str]: ...

    def writers_in(self, execution_ino: int) -> int: ...

    def nodes_changed(self, inos: Iterable[int]) -> None: ...

    def blobs_removed(self, blobs: Iterable[BlobRef]) -> None: ...


class NotMounted:
    """The Live of a store no daemon serves: nothing in flight, no kernel to tell."""

    def pinned_digests(self) -> set[str]:
        return set()

    def writers_in(self, execution_ino: int) -> int:
        return 0

    def nodes_changed(self, inos: Iterable[int]) -> None:
        return None

    def blobs_removed(self, blobs: Iterable[BlobRef]) -> None:
        return None


Progress = Callable[[str, int, int], None]  # (what, done, total); may be called from threads


def root_hash(artifacts: Iterable[tuple[str, str]]) -> str:
    """The root of a run: SHA-256 over its sorted '<path>\\0<sha256>\\n' lines (paths below
    the execution, sorted as UTF-8 bytes). Equal outputs give equal roots, whatever the run's
    name or when it ran."""
    lines = sorted((rel.encode(), digest) for rel, digest in artifacts)
    return digest_of_chunks(rel + b"\0" + digest.encode() + b"\n" for rel, digest in lines)[0]


def _version_json(version: Version, current_id: int | None) -> dict[str, Any]:
    return {
        "version": version.version_id, "sha256": version.digest, "size": version.size,
        "uid": version.uid, "gid": version.gid, "mode": f"{version.mode:o}",
        "published": iso_time(version.created_ns), "published_ns": version.created_ns,
        "replaced": iso_time(version.replaced_ns), "path": version.path,
        "current": version.version_id == current_id, "damaged": version.damaged,
    }


@dataclass
class Admin:
    store: Store
    runtime: Runtime
    live: Live
    mounted: bool
    progress: Progress = lambda what, done, total: None
    # What the mount would let one artifact grow to; an import holds its bundle to it too.
    max_artifact_size: int = DEFAULT_MAX_ARTIFACT_SIZE

    @property
    def manifest(self) -> Manifest:
        return self.store.manifest

    @property
    def blobs(self) -> BlobStore:
        return self.store.blobs

    async def run(self, command: str, args: dict[str, Any], files: list[IO[bytes]]
                  ) -> dict[str, Any]:
        handlers: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
            "log": self.log, "version": self.version, "seal": self.seal,
            "unseal": self.unseal, "find": self.find, "gc": self.gc, "repair": self.repair,
        }
        if command in handlers:
            return await handlers[command](**args)
        if command == "export":
            return await self.export(files[0], **args)
        if command == "import":
            return await self.import_bundle(files[0], **args)
        raise InvalidArgument(f"unknown command {command!r}")

    # -- lookups --------------------------------------------------------------------------

    def _node(self, path: str) -> Node:
        node = self.manifest.resolve(path)
        if node is None:
            raise NotFound(f"{path}: no such artifact or directory")
        return node

    def _execution(self, path: str) -> Node:
        node = self._node(path)
        if node.kind is not Kind.EXECUTION:
            raise InvalidArgument(f"{path} is not an execution (runs/<execution>)")
        return node

    async def log(self, path: str) -> dict[str, Any]:
        node = self.manifest.resolve(path)
        if node is not None and node.kind is not Kind.FILE:
            raise InvalidArgument(f"{path} is a directory, not an artifact")
        versions = self.manifest.history(node.ino if node else None, path)
        if not versions:
            raise NotFound(f"{path}: no such artifact, and none was ever published there")
        current = node.version_id if node else None
        return {"path": path, "versions": [_version_json(v, current) for v in versions]}

    async def version(self, path: str, version: int | None = None) -> dict[str, Any]:
        """Where to read one version of an artifact (the current one if `version` is None)."""
        node = self.manifest.resolve(path)
        history = self.manifest.history(node.ino if node else None, path)
        wanted = version if version is not None else (node.version_id if node else None)
        found = next((v for v in history if v.version_id == wanted), None)
        if found is None:
            what = f"version {version}" if version is not None else "a current version"
            raise NotFound(f"{path} has no {what} (see cafs log {path})")
        if found.damaged:
            raise Damaged(f"{path}@{found.version_id}: its content {found.digest} is damaged")
        blob = self.manifest.blob(found.digest)
        assert blob is not None
        return {"path": path, "version": found.version_id, "sha256": found.digest,
                "size": found.size, "encoding": blob.encoding}

    async def find(self, run: str | None = None, layer: str | None = None,
                   tags: list[list[str | None]] | None = None,
                   sha256: str | None = None) -> dict[str, Any]:
        manifest = self.manifest
        if layer is not None and run is None:
            raise InvalidArgument("--layer needs --run")
        scope = "runs/" + "/".join(part for part in (run, layer) if part is not None)
        # A clear "no such run" rather than an empty answer.
        top = self._node(scope).ino if run is not None else RUNS_INODE
        if sha256 is not None and not is_digest(sha256):
            raise InvalidArgument(f"not a sha256: {sha256!r} (64 lowercase hex digits)")
        chosen: set[int] | None = None
        for name, value in tags or []:
            assert name is not None
            found = manifest.nodes_tagged(name, None if value is None else value.encode())
            chosen = found if chosen is None else chosen & found
        if sha256 is not None:
            found = manifest.nodes_holding(sha256)
            chosen = found if chosen is None else chosen & found
        if chosen is None:  # only a scope: every artifact in it
            prefix = scope.rstrip("/") + "/"
            paths = [prefix + rel for rel, node in manifest.subtree(top)
                     if node.kind is Kind.FILE and node.version_id is not None]
        else:
            paths = sorted(p for p in map(manifest.path_of, chosen)
                           if run is None or p.startswith(scope + "/"))
        return {"paths": paths}

    # -- sealing --------------------------------------------------------------------------

    def _artifacts_of(self, execution: Node) -> list[tuple[str, str]]:
        return [(rel, node.blob.digest) for rel, node in self.manifest.subtree(execution.ino)
                if node.kind is Kind.FILE and node.blob is not None]

    async def seal(self, path: str) -> dict[str, Any]:
        execution = self._execution(path)
        if execution.sealed_ns is not None:
            return {"path": path, "root_sha256": self.manifest.root_of(execution.ino),
                    "already": True}
        writers = self.live.writers_in(execution.ino)
        if writers:
            raise Busy(f"{path} has {writers} files open for writing; close them first")
        artifacts = self._artifacts_of(execution)
        root = root_hash(artifacts)
        self.manifest.seal(execution.ino, root, time.time_ns())
        self.live.nodes_changed([execution.ino])
        return {"path": path, "root_sha256": root, "artifacts": len(artifacts),
                "already": False}

    async def unseal(self, path: str) -> dict[str, Any]:
        execution = self._execution(path)
        self.manifest.unseal(execution.ino, time.time_ns())
        self.live.nodes_changed([execution.ino])
        return {"path": path}

    # -- garbage collection ---------------------------------------------------------------

    async def gc(self, keep_versions: int | None = None, dry_run: bool = False,
                 orphan_grace: int = DEFAULT_ORPHAN_GRACE) -> dict[str, Any]:
        """Drop superseded versions beyond the retention and the history of deleted artifacts,
        then every blob nothing references (rows, then files), and orphan blob files."""
        if keep_versions is not None and keep_versions < 0:
            raise InvalidArgument("--keep-versions must be 0 or more")
        manifest = self.manifest
        drop: list[int] = []
        kept: Counter[int] = Counter()
        resolver = _PathResolver(manifest)
        superseded = manifest.superseded_versions()  # newest first
        for index, (version_id, node_id, path) in enumerate(superseded):
            if node_id is None:  # its node is gone: is there a live artifact at that path?
                node_id = resolver.live_file(path)
            if node_id is None:  # the artifact was deleted: its history goes too
                drop.append(version_id)
            else:
                kept[node_id] += 1
                if keep_versions is not None and kept[node_id] > keep_versions:
                    drop.append(version_id)
            if index % 2000 == 1999:
                # Let filesystem requests in. What changes meanwhile only shifts which history
                # is kept: blob rows and files are re-checked when they are removed.
                await self.runtime.checkpoint()
        plan = manifest.collect(drop, keep_blobs=self.live.pinned_digests(), dry_run=dry_run)
        orphans, young = await self._orphan_blob_files(orphan_grace)
        reclaimed = sum(blob.stored_size for blob in plan.blobs)
        if dry_run:
            reclaimed += sum(size for _, size in orphans)
            removed_orphans = len(orphans)
        else:
            self.live.blobs_removed(plan.blobs)
            crashpoints.reached("inside-gc")  # rows gone, files not yet: they become orphans
            await self._delete_unreferenced([blob.digest for blob in plan.blobs])
            removed = await self._delete_unreferenced([digest for digest, _ in orphans])
            removed_orphans = len(removed)
            reclaimed += sum(size for digest, size in orphans if digest in removed)
        return {
            "dry_run": dry_run, "versions_removed": plan.versions,
            "blobs_removed": len(plan.blobs), "orphan_files_removed": removed_orphans,
            "orphan_files_kept": young,
            "bytes_reclaimed": reclaimed, "blobs": [blob.digest for blob in plan.blobs],
        }

    async def _orphan_blob_files(self, grace: int) -> tuple[list[tuple[str, int]], int]:
        """Blob files no manifest row names (a crash between the rename and the commit) and
        older than `grace` seconds (by mtime), and how many younger ones are kept."""
        on_disk = await self.runtime.run_in_thread(_list_blob_files, self.blobs)
        known = self.manifest.known_digests([digest for digest, _, _ in on_disk])
        cutoff = time.time_ns() - grace * 1_000_000_000
        orphans = [(digest, size, mtime) for digest, size, mtime in on_disk
                   if digest not in known]
        old = [(digest, size) for digest, size, mtime in orphans if mtime <= cutoff]
        return old, len(orphans) - len(old)

    async def _delete_unreferenced(self, digests: list[str]) -> set[str]:
        """Delete blob files, in batches on the event loop: each batch checks, in the same
        step as the unlinks, that no manifest row names the digest and no write in flight is
        about to (a publish may have brought the content back since it was chosen)."""
        removed: set[str] = set()
        for start in range(0, len(digests), DELETE_BATCH):
            removed |= self._delete_batch(digests[start:start + DELETE_BATCH])
            await self.runtime.checkpoint()
        return removed

    def _delete_unreferenced_now(self, digests: list[str]) -> set[str]:
        """The same in one step, for clean-up after a failure (which may be a cancellation:
        no await)."""
        removed: set[str] = set()
        for start in range(0, len(digests), DELETE_BATCH):
            removed |= self._delete_batch(digests[start:start + DELETE_BATCH])
        return removed

    def _delete_batch(self, batch: list[str]) -> set[str]:
        removed: set[str] = set()
        needed = self.manifest.known_digests(batch) | self.live.pinned_digests()
        for digest in batch:
            if digest in needed:
                continue
            with contextlib.suppress(FileNotFoundError):
                self.blobs.delete(Digest(digest))
                removed.add(digest)
        return removed

    # -- repair ---------------------------------------------------------------------------

    async def repair(self, orphan_grace: int = DEFAULT_ORPHAN_GRACE) -> dict[str, Any]:
        """fsck --repair: check every blob file (re-hashing it), then fix what can be fixed in
        one manifest transaction; move files whose bytes are wrong to quarantine/."""
        manifest = self.manifest
        problems = manifest.check_integrity()
        if problems:
            raise StoreError(f"the manifest itself is damaged ({problems[0]}); restore it from "
                             "a backup: fsck cannot repair it")
        bad: dict[int, tuple[BlobRef, str]] = {}
        total, checked, after = manifest.totals().blobs, 0, 0
        while page := manifest.blobs_page(after, CHECK_PAGE):
            results = await self.runtime.run_in_thread(_check_blobs, self.store, page)
            bad.update({blob.blob_id: (blob, why) for blob, why in results})
            after = page[-1].blob_id
            checked += len(page)
            self.progress("checking blobs", checked, total)
        was_damaged = manifest.blob_ids_damaged()
        pinned = self.live.pinned_digests()
        bad = {blob_id: found for blob_id, found in bad.items()
               if found[0].digest not in pinned}
        drift = manifest.refcount_drift()
        plan = RepairPlan(damaged=sorted(bad), sound=sorted(was_damaged - bad.keys()),
                          drift=bool(drift), remove_unpublished=not self.mounted)
        unpublished = 0 if self.mounted else manifest.unpublished_count()
        fixed = manifest.repair(plan, time.time_ns())
        aggregates, _ = manifest.aggregate_drift(limit=0)
        if aggregates:
            manifest.recompute_aggregates()
        # Right after the commit, with no await in between: move wrong bytes out of the way
        # (a missing file has nothing to move).
        quarantined = [self._quarantine(blob) for blob, _ in bad.values()]
        newly = [blob_id for blob_id in bad if blob_id not in was_damaged]
        self.live.nodes_changed(manifest.nodes_holding_blobs(newly))
        orphans, young = await self._orphan_blob_files(orphan_grace)
        removed = await self._delete_unreferenced([digest for digest, _ in orphans])
        temps = self._remove_stray_temps()
        damaged_paths = sorted(manifest.path_of(node_id) for node_id in
                               manifest.nodes_holding_blobs(sorted(manifest.blob_ids_damaged())))
        return {
            "blobs_checked": checked,
            "damaged": [problem for _, problem in bad.values()],
            "quarantined": [name for name in quarantined if name],
            "healed": len(plan.sound),
            "refcounts_fixed": fixed,
            "aggregates_fixed": aggregates,
            "orphan_files_removed": len(removed),
            "orphan_files_kept": young,
            "temp_files_removed": temps,
            "unfinished_files_removed": unpublished,
            "damaged_artifacts": damaged_paths,
        }

    def _quarantine(self, blob: BlobRef) -> str | None:
        """Move a blob file whose bytes are wrong to <store>/quarantine/ (kept for forensics,
        out of every read path)."""
        target_dir = self.store.root / QUARANTINE_DIR
        target_dir.mkdir(mode=0o700, exist_ok=True)
        name = f"{blob.digest}.{time.time_ns()}"
        try:
            os.rename(self.blobs.path_of(blob.digest), target_dir / name)
        except FileNotFoundError:
            return None
        return name

    def _remove_stray_temps(self) -> int:
        """Temp files left by a crash. While mounted there are none: the daemon emptied tmp/
        when it started, so every temp file there now is a write in progress."""
        if self.mounted:
            return 0
        return self.blobs.clean_tmp()

    # -- export and import ----------------------------------------------------------------

    async def export(self, out: IO[bytes], path: str) -> dict[str, Any]:
        manifest = self.manifest
        execution = self._execution(path)
        top = self._tree_entry("", execution, ())
        entries: list[TreeEntry] = []
        digests: set[str] = set()
        for rel, node in manifest.subtree(execution.ino):
            if node.kind is Kind.FILE and node.version_id is None:
                continue  # its first write is still in progress
            history: tuple[Version, ...] = ()
            if node.kind is Kind.FILE:
                # The current version last (import takes the last as current): a version
                # published here by an artifact since replaced by a rename can be newer.
                found = manifest.history(node.ino, f"{path}/{rel}")
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
        return {"path": path, "artifacts": sum(e.kind is Kind.FILE for e in entries),
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
            artifacts = [(e.rel, e.versions[-1].digest) for e in header.entries
                         if e.kind is Kind.FILE]
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
        return {"path": f"runs/{name}", "artifacts": sum(e.kind is Kind.FILE for e in entries),
                "blobs_added": len(added), "blobs_present": len(present),
                "root_sha256": header.sealed[1] if header.sealed else None}


class _PathResolver:
    """Which live artifact is at a path, remembering every directory on the way, so the
    history of a deleted run with 100,000 artifacts costs one lookup per directory."""

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._dirs: dict[str, int | None] = {"runs": RUNS_INODE}

    def live_file(self, path: str) -> int | None:
        parent_path, _, name = path.rpartition("/")
        parent = self._dir(parent_path)
        if parent is None:
            return None
        node = self._manifest.child(parent, name)
        return node.ino if node is not None and node.kind is Kind.FILE else None

    def _dir(self, path: str) -> int | None:
        if path in self._dirs:
            return self._dirs[path]
        parent_path, _, name = path.rpartition("/")
        parent = self._dir(parent_path) if parent_path else None
        node = self._manifest.child(parent, name) if parent is not None else None
        found = node.ino if node is not None and node.kind.is_dir else None
        self._dirs[path] = found
        return found


def _list_blob_files(blobs: BlobStore) -> list[tuple[str, int, int]]:
    """(digest, size, mtime_ns) of every blob file."""
    found = []
    for digest in blobs.iter_digests():
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(blobs.path_of(digest))
            found.append((str(digest), info.st_size, info.st_mtime_ns))
    return found


def _check_blobs(store: Store, page: list[BlobRef]) -> list[tuple[BlobRef, str]]:
    """Runs in a worker thread: what is wrong with each blob's file, re-hashing its bytes."""
    found = ((blob, store.blob_file_problem(blob) or store.content_problem(blob))
             for blob in page)
    return [(blob, problem) for blob, problem in found if problem is not None]
