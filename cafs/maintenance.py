"""Maintenance of a store: the check (fsck), its repair, and garbage collection.

Owns: deciding what is damage (an artifact could return wrong bytes or none) and what is only
garbage (left by a crash, harmless, reclaimable); the one way orphan blob files
(`orphan_blob_files`) and stray temp files (`stray_temps`) are found; removing what nothing
needs; and the typed reports (`CheckReport`, `RepairReport`, `GcReport`).

The check is read-only and synchronous: safe while the store is mounted, run in the `cafs`
process. Repair and gc change the store: they run inside the daemon when it is mounted (the
control socket), else in the `cafs` command holding the store's lock (cafs.admin).

Concurrency rule, inside the daemon: manifest calls run on the event loop's thread, between
filesystem requests, so each is atomic with respect to them; hashing and listing blob files go
to worker threads. Deleting blob files happens in small batches on the loop thread, each
re-checking that no row and no write in flight (`Live.pinned_digests`) needs the file, so gc
never removes content a live artifact or a write about to publish uses.

Must not import trio, pyfuse3 or the daemon.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Self

from cafs import crashpoints
from cafs.admin_context import AdminContext, JsonResult, Live, Progress
from cafs.blobstore import Blobs
from cafs.digest import Digest
from cafs.errors import Busy, InvalidArgument, StoreError
from cafs.manifest import Manifest, RepairPlan
from cafs.model import BlobRef
from cafs.store import Store

DELETE_BATCH = 256
# Orphan blob files (no manifest row names them) are removed only once this old: a young one
# may be the only copy of an artifact whose manifest row was lost (a damaged WAL, a restored
# backup), and fsck lists those until then.
DEFAULT_ORPHAN_GRACE = 7 * 24 * 3600
# On a manifest several hosts share, a blob whose last reference went is deleted only this
# long after (a reader on another host may have it open; its kernel may still cache it).
DEFAULT_GC_GRACE = 3600
CHECK_PAGE = 256


# -- reports ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckReport(JsonResult):
    damage: tuple[str, ...] = ()  # makes the exit status non-zero
    garbage: tuple[str, ...] = ()  # orphans a crash can leave; harmless
    # Content an earlier --repair marked damaged: known, reads give EIO; not new damage.
    lost: tuple[str, ...] = ()
    # Orphan blob files newer than the manifest's last commit: stored after everything the
    # manifest knows, so their rows may have been lost (a damaged WAL, a restored backup).
    # Not clean: gc keeps them for its grace period; look before that runs out.
    lost_metadata: tuple[str, ...] = ()
    blobs_checked: int = 0
    blobs_rehashed: int = 0

    @property
    def clean(self) -> bool:
        return not self.damage and not self.lost_metadata

    def to_json(self) -> dict[str, Any]:
        # The shape `cafs fsck --json` has always printed (lost_metadata under a name that says
        # what it means to a reader, and the verdict).
        return {"damage": list(self.damage), "garbage": list(self.garbage),
                "lost": list(self.lost), "possible_lost_metadata": list(self.lost_metadata),
                "blobs_checked": self.blobs_checked, "blobs_rehashed": self.blobs_rehashed,
                "clean": self.clean}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        return cls(tuple(data["damage"]), tuple(data["garbage"]), tuple(data["lost"]),
                   tuple(data["possible_lost_metadata"]), data["blobs_checked"],
                   data.get("blobs_rehashed", 0))


@dataclass(frozen=True)
class RepairReport(JsonResult):
    blobs_checked: int  # every one re-hashed
    damaged: tuple[str, ...]  # what was wrong with each blob newly or still found bad
    quarantined: tuple[str, ...]  # file names moved to quarantine/
    healed: int  # blobs marked damaged earlier whose files are right again
    refcounts_fixed: int
    aggregates_fixed: int
    orphan_files_removed: int
    orphan_files_kept: int  # younger than the grace period
    temp_files_removed: int
    unfinished_files_removed: int
    damaged_artifacts: tuple[str, ...]  # paths whose reads give EIO until written again


@dataclass(frozen=True)
class GcReport(JsonResult):
    dry_run: bool
    versions_removed: int
    blobs_removed: int
    orphan_files_removed: int
    orphan_files_kept: int  # younger than the grace period
    bytes_reclaimed: int
    blobs: tuple[str, ...]  # digests of the blobs removed (or that would be)


# -- finding what nothing needs -------------------------------------------------------------


@dataclass(frozen=True)
class BlobFile:
    digest: str
    size: int
    mtime_ns: int


def list_blob_files(blobs: Blobs) -> list[BlobFile]:
    """Every stored blob (a file, or an object in a bucket). I/O only: safe in a worker
    thread."""
    return [BlobFile(str(digest), size, mtime_ns)
            for digest, size, mtime_ns in blobs.blob_files()]


def orphan_blob_files(manifest: Manifest, files: list[BlobFile]) -> list[BlobFile]:
    """The blob files no manifest row names (a crash between the rename and the commit, rows
    lost with a damaged WAL, rows gc removed before their files): the one definition check,
    repair and gc share. On the manifest's thread."""
    known = manifest.known_digests([file.digest for file in files])
    return [file for file in files if file.digest not in known]


def stray_temps(blobs: Blobs, *, mounted: bool) -> list[str]:
    """Names of the temp files a crash left in tmp/. While mounted there are none: the daemon
    emptied tmp/ when it started, so every temp file there now is a write in progress."""
    if mounted:
        return []
    try:
        fd = _open_tmp(blobs)
    except FileNotFoundError:
        return []
    try:
        with os.scandir(fd) as entries:
            return sorted(entry.name for entry in entries
                          if not entry.is_dir(follow_symlinks=False))
    finally:
        os.close(fd)


def _open_tmp(blobs: Blobs) -> int:
    # Never through a symlink planted in place of tmp/ (cafs.store refuses such a store; this
    # holds even if that check was skipped): removals happen relative to this descriptor.
    return os.open(blobs.tmp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _remove_temps(blobs: Blobs, names: list[str]) -> int:
    if not names:
        return 0
    removed = 0
    fd = _open_tmp(blobs)
    try:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)  # a symlink itself, never what it points at
                removed += 1
    finally:
        os.close(fd)
    return removed


def delete_unreferenced_now(store: Store, live: Live, digests: list[str]) -> set[str]:
    """Delete the blob files of `digests` that no manifest row names and no write in flight
    pins, in one step (for clean-up after a failure, which may be a cancellation: no await).
    Returns the digests whose files were removed."""
    removed: set[str] = set()
    for start in range(0, len(digests), DELETE_BATCH):
        removed |= _delete_batch(store, live, digests[start:start + DELETE_BATCH])
    return removed


def _delete_batch(store: Store, live: Live, batch: list[str]) -> set[str]:
    locked = store.manifest.lock_for_delete(batch)
    try:
        return _delete_each(store.blobs, _unneeded(store, live, locked))
    finally:
        store.manifest.unlock_deleted(locked)


def _unneeded(store: Store, live: Live, batch: list[str]) -> list[Digest]:
    """The digests of `batch` no manifest row names and no write in flight pins. On a shared
    manifest `batch` must be locked against other hosts' pins first (lock_for_delete): a row
    committed before that is seen here, and a publish after it waits for the delete."""
    needed = store.manifest.known_digests(batch) | live.pinned_digests()
    return [Digest(digest) for digest in batch if digest not in needed]


def _delete_each(blobs: Blobs, doomed: list[Digest]) -> set[str]:
    removed: set[str] = set()
    try:
        for digest in doomed:
            with contextlib.suppress(FileNotFoundError):
                blobs.delete(digest)
                removed.add(digest)
    finally:  # a failure (the service is out) leaves the rest: publishes must not wait
        blobs.deleted(doomed)
    return removed


# -- the check ------------------------------------------------------------------------------


def check(store: Store, *, full: bool, mounted: bool,
          progress: Progress | None = None) -> CheckReport:
    """fsck: the manifest against the blob files; `full` re-hashes every blob. Read-only.
    `progress` hears of every blob checked (a terminal's progress bar)."""
    damage: list[str] = []
    garbage: list[str] = []
    lost: list[str] = []
    lost_metadata: list[str] = []
    checked = rehashed = 0
    manifest = store.manifest
    damage += [f"manifest: {line}" for line in manifest.check_integrity()]
    damage += manifest.dangling()
    for digest, recorded, actual in manifest.refcount_drift():
        damage.append(f"blob {digest}: refcount {recorded}, but {actual} artifacts use it")
    # Wrong aggregates make records lie (no content is at risk): --repair recomputes them.
    drifted, described = manifest.aggregate_drift()
    damage += described
    if drifted > len(described):
        damage.append(f"... and {drifted - len(described)} more nodes whose aggregates drift")

    total = manifest.totals().blobs if progress is not None else 0
    for blob in manifest.all_blobs():
        checked += 1
        if progress is not None:
            progress("re-hashing blobs" if full else "checking blobs", checked, total)
        if blob.damaged:
            lost.append(f"blob {blob.digest}: marked damaged ({blob.size} bytes lost; "
                        "write or import the same content to heal it)")
            continue
        problem = store.blob_file_problem(blob)
        if problem is None and full:
            rehashed += 1
            problem = store.content_problem(blob)
        if problem is not None:
            damage.append(problem)

    # While mounted, a blob file renamed into place whose commit is about to follow is no
    # loss; the daemon stamped the manifest when it started, after checking it.
    last_commit = 0 if mounted else manifest.last_commit_ns()
    for orphan in orphan_blob_files(manifest, list_blob_files(store.blobs)):
        if not mounted and orphan.mtime_ns > last_commit:
            lost_metadata.append(
                f"blob {orphan.digest}: not in the manifest and written after its last commit: "
                "possible lost metadata (an artifact whose row was lost; gc keeps it for its "
                "grace period)")
        else:
            garbage.append(f"blob {orphan.digest}: not in the manifest (orphan)")
    for name in stray_temps(store.blobs, mounted=mounted):
        garbage.append(f"temp file {name}: left by an unclean stop")
    if not mounted:  # while mounted these are writes in progress, not garbage
        unpublished = manifest.unpublished_count()
        if unpublished:
            garbage.append(f"{unpublished} files whose first write never completed")
    return CheckReport(tuple(damage), tuple(garbage), tuple(lost), tuple(lost_metadata),
                       checked, rehashed)


# -- repair and gc --------------------------------------------------------------------------


class Maintenance(AdminContext):
    """fsck --repair and gc on a store, mounted (in the daemon) or not (under its lock)."""

    async def gc(self, keep_versions: int | None = None, dry_run: bool = False,
                 orphan_grace: int = DEFAULT_ORPHAN_GRACE,
                 gc_grace: int = DEFAULT_GC_GRACE) -> GcReport:
        """Drop superseded versions beyond the retention and the history of deleted artifacts,
        then every blob nothing references (rows, then files), and orphan blob files.

        On a manifest several hosts may share (PostgreSQL): one gc at a time over the whole
        store (Busy if another runs, on any host), and never a blob a write in flight on any
        host pins; with blobs in shared storage (S3) too, a blob goes only once its last
        reference went `gc_grace` seconds ago (readers on other hosts may still hold it), and
        orphans only once older than that as well."""
        if keep_versions is not None and keep_versions < 0:
            raise InvalidArgument("--keep-versions must be 0 or more")
        manifest = self.manifest
        if not manifest.gc_lock():
            raise Busy("another cafs gc is running on this store (on this host or another): "
                       "try again when it ends")
        try:
            several_hosts = self._several_hosts()
            manifest.set_gc_grace(gc_grace if several_hosts else 0)
            if several_hosts:
                orphan_grace = max(orphan_grace, gc_grace)
            return await self._gc(keep_versions, dry_run, orphan_grace)
        finally:
            manifest.gc_unlock()

    async def _gc(self, keep_versions: int | None, dry_run: bool,
                  orphan_grace: int) -> GcReport:
        manifest = self.manifest
        drop: list[int] = []
        kept: Counter[int] = Counter()
        superseded = manifest.superseded_versions()  # each history's newest first
        for index, (version_id, history_id, held) in enumerate(superseded):
            if not held:  # the path's last artifact was deleted: its history goes too
                drop.append(version_id)
            else:
                kept[history_id] += 1
                if keep_versions is not None and kept[history_id] > keep_versions:
                    drop.append(version_id)
            if index % 2000 == 1999:
                # Let filesystem requests in. What changes meanwhile only shifts which history
                # is kept: blob rows and files are re-checked when they are removed.
                self.progress("reading history", index + 1, len(superseded))
                await self.runtime.checkpoint()
        self.progress("reading history", len(superseded), len(superseded))
        plan = manifest.collect(drop, keep_blobs=self.live.pinned_digests(), dry_run=dry_run)
        orphans, young = await self._old_orphans(orphan_grace)
        reclaimed = sum(blob.stored_size for blob in plan.blobs)
        if dry_run:
            reclaimed += sum(orphan.size for orphan in orphans)
            removed_orphans = len(orphans)
        else:
            self.live.blobs_removed(plan.blobs)
            crashpoints.reached("inside-gc")  # rows gone, files not yet: they become orphans
            await self._delete_unreferenced([blob.digest for blob in plan.blobs])
            removed = await self._delete_unreferenced([orphan.digest for orphan in orphans])
            removed_orphans = len(removed)
            reclaimed += sum(orphan.size for orphan in orphans if orphan.digest in removed)
        return GcReport(dry_run, plan.versions, len(plan.blobs), removed_orphans, young,
                        reclaimed, tuple(blob.digest for blob in plan.blobs))

    def _several_hosts(self) -> bool:
        """Other hosts can serve only a manifest on a server with blobs in shared storage: a
        PostgreSQL manifest over one host's blobs/ keeps single-host rules."""
        return self.manifest.shared and self.blobs.remote

    async def repair(self, orphan_grace: int = DEFAULT_ORPHAN_GRACE,
                     gc_grace: int = DEFAULT_GC_GRACE) -> RepairReport:
        """fsck --repair: check every blob file (re-hashing it), then fix what can be fixed in
        one manifest transaction; move files whose bytes are wrong to quarantine/. Orphans go
        as in gc: with several hosts, only once older than `gc_grace` too (a reader elsewhere
        may still read an object whose row gc removed a moment ago)."""
        if self._several_hosts():
            orphan_grace = max(orphan_grace, gc_grace)
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
        quarantined = [self.blobs.quarantine(blob.digest) for blob, _ in bad.values()]
        newly = [blob_id for blob_id in bad if blob_id not in was_damaged]
        self.live.nodes_changed(manifest.nodes_holding_blobs(newly))
        orphans, young = await self._old_orphans(orphan_grace)
        removed = await self._delete_unreferenced([orphan.digest for orphan in orphans])
        temps = _remove_temps(self.blobs, stray_temps(self.blobs, mounted=self.mounted))
        damaged_paths = sorted(manifest.path_of(node_id) for node_id in
                               manifest.nodes_holding_blobs(sorted(manifest.blob_ids_damaged())))
        return RepairReport(
            blobs_checked=checked, damaged=tuple(problem for _, problem in bad.values()),
            quarantined=tuple(name for name in quarantined if name), healed=len(plan.sound),
            refcounts_fixed=fixed, aggregates_fixed=aggregates,
            orphan_files_removed=len(removed), orphan_files_kept=young,
            temp_files_removed=temps, unfinished_files_removed=unpublished,
            damaged_artifacts=tuple(damaged_paths))

    async def _old_orphans(self, grace: int) -> tuple[list[BlobFile], int]:
        """Orphan blob files older than `grace` seconds (by mtime), and how many younger ones
        are kept."""
        files = await self.runtime.run_in_thread(list_blob_files, self.blobs)
        orphans = orphan_blob_files(self.manifest, files)
        cutoff = time.time_ns() - grace * 1_000_000_000
        old = [orphan for orphan in orphans if orphan.mtime_ns <= cutoff]
        return old, len(orphans) - len(old)

    async def _delete_unreferenced(self, digests: list[str]) -> set[str]:
        """Delete blob files, in batches on the event loop: each batch checks, in the same
        step as the unlinks, that no manifest row names the digest and no write in flight is
        about to (a publish may have brought the content back since it was chosen)."""
        removed: set[str] = set()
        for start in range(0, len(digests), DELETE_BATCH):
            batch = digests[start:start + DELETE_BATCH]
            if self.blobs.remote:
                # Chosen on the loop; from then on a publish of one of them waits until its
                # object is gone and uploads it anew (see S3BlobStore.deleting; on another
                # host, the lock taken here), so the deletes themselves may wait for the
                # network in a worker thread.
                locked = self.manifest.lock_for_delete(batch)
                try:
                    doomed = _unneeded(self.store, self.live, locked)
                    self.blobs.deleting(doomed)
                    crashpoints.reached("gc-before-delete")
                    removed |= await self.runtime.run_in_thread(_delete_each, self.blobs,
                                                                doomed)
                finally:
                    self.manifest.unlock_deleted(locked)
            else:
                removed |= _delete_batch(self.store, self.live, batch)
            self.progress("removing blobs", min(start + DELETE_BATCH, len(digests)),
                          len(digests))
            await self.runtime.checkpoint()
        return removed


def _check_blobs(store: Store, page: list[BlobRef]) -> list[tuple[BlobRef, str]]:
    """Runs in a worker thread: what is wrong with each blob's file, re-hashing its bytes."""
    found = ((blob, store.blob_file_problem(blob) or store.content_problem(blob))
             for blob in page)
    return [(blob, problem) for blob, problem in found if problem is not None]
