"""Consistency check of a store: the manifest against the blob files.

Owns: deciding what is damage (an artifact could return wrong bytes or none) and what is only
garbage (left by a crash, harmless, reclaimable). Read-only: it never changes the store, so it is
safe while the store is mounted. Must not know FUSE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cafs.store import Store


@dataclass
class FsckReport:
    damage: list[str] = field(default_factory=list)  # makes the exit status non-zero
    garbage: list[str] = field(default_factory=list)  # orphans a crash can leave; harmless
    # Content an earlier --repair marked damaged: known, reads give EIO; not new damage.
    lost: list[str] = field(default_factory=list)
    # Orphan blob files newer than the manifest's last commit: stored after everything the
    # manifest knows, so their rows may have been lost (a damaged WAL, a restored backup).
    # Not clean: gc keeps them for its grace period; look before that runs out.
    lost_metadata: list[str] = field(default_factory=list)
    blobs_checked: int = 0
    blobs_rehashed: int = 0

    @property
    def clean(self) -> bool:
        return not self.damage and not self.lost_metadata


def fsck(store: Store, *, full: bool, mounted: bool) -> FsckReport:
    report = FsckReport()
    manifest, blobs = store.manifest, store.blobs
    report.damage += [f"manifest: {line}" for line in manifest.check_integrity()]
    report.damage += manifest.dangling()
    for digest, recorded, actual in manifest.refcount_drift():
        report.damage.append(f"blob {digest}: refcount {recorded}, but {actual} artifacts use it")
    # Wrong aggregates make records lie (no content is at risk): --repair recomputes them.
    drifted, described = manifest.aggregate_drift()
    report.damage += described
    if drifted > len(described):
        report.damage.append(f"... and {drifted - len(described)} more nodes whose aggregates "
                             "drift")

    known = set()
    for blob in manifest.all_blobs():
        report.blobs_checked += 1
        known.add(blob.digest)
        if blob.damaged:
            report.lost.append(f"blob {blob.digest}: marked damaged ({blob.size} bytes lost; "
                               "write or import the same content to heal it)")
            continue
        problem = store.blob_file_problem(blob)
        if problem is not None:
            report.damage.append(problem)
            continue
        if full:
            report.blobs_rehashed += 1
            problem = store.content_problem(blob)
            if problem is not None:
                report.damage.append(problem)

    # While mounted, a blob file renamed into place whose commit is about to follow is no
    # loss; the daemon stamped the manifest when it started, after checking it.
    last_commit = 0 if mounted else manifest.last_commit_ns()
    for digest in blobs.iter_digests():
        if digest in known:
            continue
        try:
            mtime = os.lstat(blobs.path_of(digest)).st_mtime_ns
        except FileNotFoundError:
            continue
        if not mounted and mtime > last_commit:
            report.lost_metadata.append(
                f"blob {digest}: not in the manifest and written after its last commit: "
                "possible lost metadata (an artifact whose row was lost; gc keeps it for its "
                "grace period)")
        else:
            report.garbage.append(f"blob {digest}: not in the manifest (orphan)")
    if not mounted:
        # While mounted these are writes in progress, not garbage.
        for entry in sorted(blobs.tmp_dir.iterdir()):
            report.garbage.append(f"temp file {entry.name}: left by an unclean stop")
        unpublished = manifest.unpublished_count()
        if unpublished:
            report.garbage.append(f"{unpublished} files whose first write never completed")
    return report
