"""What the rest of cafs may ask of the manifest: typed protocols and the records they return.

Owns: the manifest's interface, split by what its callers need — the namespace (nodes, lookups,
tree changes, attributes, tags), content and versions (blobs, publish, history, refcounts),
maintenance (checks, repair, gc, aggregates, integrity, backups) and import (whole trees, bulk
loads) — and the frozen records that cross it. `Manifest` combines them: what the filesystem
core, the admin commands and fsck are written against.

Must not: hold SQL, name a database, or import an implementation. A back end implements every
method here with the same meaning; the SQLite one lives in cafs/sqlite_manifest/, the PostgreSQL
one in cafs/pg_manifest/ (tests/test_manifest_contract.py runs one suite on both). Every failure
of the database itself reaches callers as a ManifestError carrying an errno (ENOSPC when the
disk is full, EIO otherwise), never as the driver's own exception.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cafs.digest import Digest
from cafs.model import BlobRef, Kind, Node, SessionInfo, StoredBlob, TreeEntry, Version

# -- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    artifacts: int
    blobs: int
    logical_bytes: int  # sum of the sizes of live artifacts (what a plain copy would need)
    unique_bytes: int  # sum of the sizes of distinct contents (after dedup, before compression)
    stored_bytes: int  # sum of blob file sizes on disk
    versions: int
    executions: int
    layers: int


@dataclass(frozen=True)
class Space:
    """Where the store's bytes go (`cafs stats`): what live artifacts hold, what only history
    holds, and what gc would reclaim now. Contents are blobs: each counted once."""

    live_blobs: int  # contents some live artifact's current version holds (refcount > 0)
    live_unique_bytes: int  # their sizes (logical bytes after dedup, before compression)
    live_stored_bytes: int  # their blob files on disk
    history_versions: int  # versions that are not current (kept until gc)
    history_blobs: int  # contents only such versions hold
    history_bytes: int
    history_stored_bytes: int
    reclaimable_versions: int  # versions of paths whose artifacts were all removed
    reclaimable_blobs: int  # contents a plain `cafs gc` would remove: nothing live or kept
    reclaimable_bytes: int  # holds them (orphan blob files, unknown to the manifest, aside)
    reclaimable_stored_bytes: int


@dataclass(frozen=True)
class DirStats:
    """What a layer's or execution's record says about the artifacts below it: the aggregates
    the manifest keeps on every directory, up to date after every change."""

    artifacts: int
    logical_bytes: int  # sum of their sizes
    first_write_ns: int | None  # the oldest version of anything below it
    last_write_ns: int | None  # the newest


@dataclass(frozen=True, slots=True)
class RestrictedDir:
    """A directory some user may not list (its mode lacks read or search for someone): what
    records leave out for readers who may not (cafs.visibility)."""

    ino: int
    mode: int
    uid: int
    gid: int
    fence: int | None  # the nearest such directory above it, below the walk's top; None: none


@dataclass(frozen=True)
class SharingStats:
    """What deleting a directory would reclaim: needs every content below it grouped and
    compared with its refcount, O(artifacts below it). Computed on demand by `cafs stats PATH`
    (never by records, never on the daemon's event loop)."""

    artifacts: int
    logical_bytes: int
    unique_bytes: int  # sizes of contents no artifact outside this directory holds
    unique_stored_bytes: int  # what deleting the directory and running gc would reclaim


@dataclass(frozen=True)
class GcPlan:
    versions: int  # version rows removed
    blobs: list[BlobRef]  # blob rows removed: their files can go


@dataclass(frozen=True)
class RepairPlan:
    damaged: list[int]  # blob ids whose file is missing or wrong: mark damaged
    sound: list[int]  # blob ids checked sound: clear an earlier damaged mark
    drift: bool  # recompute refcounts that differ from the live artifacts
    remove_unpublished: bool  # drop files whose first write never completed (not mounted)


@dataclass(frozen=True)
class NewVersion:
    """Everything a publish records besides the blob."""

    node_id: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    content_type: str | None
    now_ns: int
    # An earlier version published through the same open file: it leaves history.
    collapses: int | None = None
    # The writer's last close: where hosts share the manifest, this mount stops being the
    # file's writer in the same transaction (see Writers.close_writer).
    ends_writer: bool = False
    # What pin() answered for this content: on a server, the publish fails (EIO) if that pin
    # went with a dropped connection, since gc on another host may have taken the blob since.
    # None: the caller pinned nothing (a single-host tool, a test).
    pin: int | None = None


@dataclass(frozen=True)
class BulkArtifact:
    """One artifact of a bulk load: a name in the new layer and its content (already in the
    blob store, as the store wrote it)."""

    name: str
    blob: StoredBlob
    mode: int = 0o644
    content_type: str | None = None


# -- the interface, by role ------------------------------------------------------------------


class Namespace(Protocol):
    """The live tree under runs/: nodes, lookups, changes, attributes, sealing, tags."""

    def node(self, node_id: int) -> Node | None: ...
    def child(self, parent_id: int, name: str) -> Node | None: ...

    def children(self, parent_id: int, after_id: int, limit: int) -> list[Node]:
        """A page of a directory, in id order (stable while entries come and go)."""
        ...

    def has_children(self, parent_id: int) -> bool: ...
    def count_executions(self) -> int: ...

    def path_of(self, node_id: int) -> str:
        """The path relative to the mount, e.g. runs/e1/train/model.bin."""
        ...

    def resolve(self, path: str) -> Node | None:
        """The node at a path relative to the mount (runs/<exec>/...), or None."""
        ...

    def subtree(self, top: int) -> Iterator[tuple[str, Node]]:
        """Every node below a directory, parents before children, with its path below it."""
        ...

    def add_node(self, parent_id: int, name: str, kind: Kind, mode: int, uid: int, gid: int,
                 now_ns: int) -> Node:
        """A new directory or (unpublished) file. AlreadyExists if the name is taken, though
        this host did not see it (another host made it, or is creating it). Where hosts share
        the manifest, a file is recorded open for writing by this mount in the same
        transaction (close_writer ends it), and a sealed run refuses it (ReadOnly) there too."""
        ...

    def set_attrs(self, node_id: int, *, mode: int, uid: int, gid: int, mtime_ns: int,
                  ctime_ns: int, atime_ns: int | None = None) -> None: ...

    def remove_node(self, node: Node, now_ns: int) -> None:
        """Unlink a file or remove an (empty) directory: the versions stay as history."""
        ...

    def rename(self, node: Node, new_parent: int, new_name: str, replaced: Node | None,
               now_ns: int) -> None: ...

    def remove_unpublished(self) -> int:
        """Drop files whose first write never completed (start-up after a crash)."""
        ...

    def seal(self, execution_id: int, root: Callable[[], str], now_ns: int) -> str:
        """Seal a run with the root hash `root()` computes, called inside the transaction that
        seals it, once no file in the run is open for writing on any host (else Busy): no
        publish lands between the hash and the seal. Returns the root."""
        ...

    def unseal(self, execution_id: int, now_ns: int) -> None: ...
    def root_of(self, execution_id: int) -> str | None: ...

    def readable_by(self, top: int, uid: int, gid: int) -> bool:
        """Whether the modes let a user list and read everything at and below a directory."""
        ...

    def tag(self, node_id: int, name: str) -> bytes | None: ...
    def tag_names(self, node_id: int) -> list[str]: ...

    def tag_usage(self, node_id: int, *, excluding: str) -> tuple[int, int]:
        """Bytes of a node's tag names (each with its NUL) and values, but `excluding`."""
        ...

    def tags_of(self, node_id: int) -> dict[str, bytes]: ...

    def tags_up_to(self, node_id: int, largest: int) -> Iterator[tuple[str, bytes | None]]:
        """A node's tags in name order; a value longer than `largest` comes as None."""
        ...

    def set_tag(self, node_id: int, name: str, value: bytes, now_ns: int) -> None: ...
    def remove_tag(self, node_id: int, name: str, now_ns: int) -> bool: ...
    def nodes_tagged(self, name: str, value: bytes | None) -> set[int]: ...


class Writers(Protocol):
    """Files open for writing, as every host serving the manifest sees them (cafs seal, the
    creates two hosts race for). A manifest only one host serves (SQLite) records nothing:
    its daemon's open-file table is the whole truth, and these calls cost nothing there."""

    # Other hosts may serve this manifest: a file row without a version may be another
    # host's create in progress (never this host's to remove), a name may appear or go
    # behind this host's back. (Declared once, in Sharing.)
    shared: bool

    def open_writer(self, node: Node) -> Node | None:
        """This mount opens an existing file for writing: recorded for every host, in a
        transaction that fails with ReadOnly if its run is sealed and NotFound if it was
        removed. Returns the node with its current version (`node` itself if no other host
        published since this host read it); None where nothing is recorded (a single host)."""
        ...

    def close_writer(self, node_id: int) -> None:
        """This mount no longer holds the file open for writing."""
        ...

    def drop_abandoned(self, node: Node, now_ns: int) -> bool:
        """A file this mount created (or joined) whose write failed or never published: ends
        this mount's writer and removes the row if it still has no version and no other host
        writes it. Returns whether the row is gone (by this call or before it)."""
        ...

    def writers_in(self, execution_id: int) -> int:
        """Files below a run open for writing on any host (0 on a single host: its daemon
        counts its own)."""
        ...


class Content(Protocol):
    """Blobs, the versions of artifacts, and the references between them."""

    def blob(self, digest: Digest) -> BlobRef | None: ...
    def blob_by_id(self, blob_id: int) -> BlobRef | None: ...
    def blobs_page(self, after_id: int, limit: int) -> list[BlobRef]: ...
    def newest_blobs(self, limit: int) -> list[BlobRef]: ...
    def all_blobs(self) -> Iterator[BlobRef]: ...
    def blob_created_ns(self, blob_id: int) -> int: ...
    def blob_ids_damaged(self) -> set[int]: ...
    def known_digests(self, digests: list[str]) -> set[str]: ...

    def refcount(self, blob_id: int) -> int:
        """The live artifacts whose current version holds this blob."""
        ...

    def publish(self, stored: StoredBlob, new: NewVersion) -> Node:
        """Record a new version of an artifact in one transaction: the previous one is marked
        replaced and its blob loses a reference; the new blob gains one."""
        ...

    def add_symlink(self, parent_id: int, name: str, stored: StoredBlob, *, uid: int, gid: int,
                    now_ns: int) -> Node:
        """A new symlink whose target is the content `stored`, with its first version, in one
        transaction."""
        ...

    def history(self, node_id: int | None, path: str) -> list[Version]:
        """The versions of the path's history (the one the node continues, else the one
        parked at `path`), by number: through renames, replacements and re-creation."""
        ...

    def version_number(self, version_id: int) -> int | None:
        """A version's number in its path's history (1..n)."""
        ...

    def nodes_holding(self, digest: str) -> set[int]:
        """Live artifacts whose current content is this digest."""
        ...

    def nodes_holding_blobs(self, blob_ids: list[int]) -> list[int]: ...


class Maintenance(Protocol):
    """Statistics, checks, repair, gc, durability and backups of the manifest as a whole."""

    @property
    def changes(self) -> int:
        """Bumped by every committed change: lets computed views know they are stale."""
        ...

    def close(self) -> None: ...

    def sync(self, durable_ns: int | None = None) -> None:
        """Make every committed change durable against power loss; `durable_ns`, if given,
        becomes the durable point (every blob stored before it is on disk)."""
        ...

    def synced_ns(self) -> int | None:
        """The last durable point recorded by sync, or None."""
        ...

    def blobs_stored_after(self, since_ns: int) -> list[BlobRef]:
        """Blob rows newer than a durable point."""
        ...

    def roll_back(self, blob_ids: list[int], now_ns: int) -> list[int]:
        """Drop these blobs and every version holding one; artifacts fall back to their
        previous version or are left unpublished. Returns the artifacts changed."""
        ...

    def mark_checked(self, now_ns: int) -> None:
        """A daemon starts on this manifest, checked intact (see last_commit_ns)."""
        ...

    def last_commit_ns(self) -> int:
        """When the manifest last recorded something; a blob file newer than this and named by
        no row may hold an artifact whose row was lost."""
        ...

    def copy_to(self, target: Path) -> None:
        """A consistent snapshot of the whole manifest into a new file (a backup), whole or
        absent; safe from a worker thread while the owner keeps committing."""
        ...

    def totals(self) -> Totals: ...

    def space(self) -> Space:
        """Live, history and reclaimable bytes: one pass over the blobs, O(blobs)."""
        ...

    def dir_stats(self, top: int) -> DirStats:
        """The aggregates over the artifacts below a directory: a few reads, not a walk."""
        ...

    def restricted_dirs(self, top: int) -> list[RestrictedDir]:
        """Every directory below `top` whose mode does not let everyone list it, at any depth:
        the same whoever asks. Reads the children only of directories that hold directories."""
        ...

    def visible_stats(self, top: int, hidden: Collection[int]) -> dict[int, DirStats]:
        """The aggregates over the artifacts below `top` that are not below any of `hidden`
        (directories below top, none inside another), for top and for every directory between
        it and a hidden one (elsewhere dir_stats is already right): a few reads per hidden
        directory, not a walk."""
        ...

    def sharing_stats(self, top: int) -> SharingStats: ...

    def check_integrity(self) -> list[str]:
        """The database's own check: problems found, [] when sound."""
        ...

    def dangling(self) -> list[str]:
        """Structural problems: records that point at records that do not exist."""
        ...

    def refcount_drift(self) -> list[tuple[str, int, int]]:
        """(digest, recorded, actual) of blobs whose refcount differs from the live artifacts."""
        ...

    def aggregate_drift(self, limit: int = 20) -> tuple[int, list[str]]:
        """Nodes whose aggregates differ from a recomputation: (how many, first `limit`)."""
        ...

    def recompute_aggregates(self) -> None: ...
    def unpublished_count(self) -> int: ...

    def repair(self, plan: RepairPlan, now_ns: int) -> int:
        """Apply what fsck --repair decided, in one transaction. Returns refcounts fixed."""
        ...

    def superseded_versions(self) -> list[tuple[int, int, bool]]:
        """(version id, history id, whether a live artifact holds that history) of every
        version not current, each history's newest first."""
        ...

    def collect(self, version_ids: list[int], *, keep_blobs: set[str], dry_run: bool) -> GcPlan:
        """Remove versions, then every blob nothing references any more (but `keep_blobs`):
        one transaction, rolled back if `dry_run`."""
        ...


class Import(Protocol):
    """Whole trees in one transaction: an imported run, a bulk-loaded layer."""

    def add_tree(self, name: str, top: TreeEntry,
                 entries: Iterable[tuple[TreeEntry, Iterable[Version]]],
                 blobs: Iterable[StoredBlob], sealed: tuple[int, str] | None,
                 now_ns: int) -> int:
        """Create runs/<name> with everything below it, histories and tags, in one
        transaction, the rows taken from the iterables as they yield them (a run of any size
        costs the same memory). `entries`: every directory before what it holds, each
        artifact with its versions oldest first (the last is current; their paths absolute);
        `blobs`: every content the versions use, already in the blob store."""
        ...

    def bulk_load_layer(self, execution: str, layer: str, artifacts: list[BulkArtifact], *,
                        mode: int, uid: int, gid: int, now_ns: int) -> int:
        """Create runs/<execution>/<layer> (and the execution if new; `mode` is the
        directories') holding `artifacts`, each with one version, in one transaction:
        refcounts, blob records and aggregates as a publish of each would leave them. Returns
        the layer's node id."""
        ...


class Sharing(Protocol):
    """Several hosts on one manifest (PostgreSQL): who serves it, who owns an unfinished file,
    pins of writes in flight and gc's locks, visible to every host. On SQLite (one mount)
    each is a no-op with the answer one host implies."""

    shared: bool  # other hosts may serve this manifest
    # This mount's session (None on SQLite); a new one after other hosts declared the mount
    # dead and removed what it was writing (see cafs.sessions).
    session_id: int | None

    def set_session_timeout(self, seconds: float) -> None:
        """A session whose last beat is older than this is dead."""
        ...

    def set_session_where(self, host: str, mountpoint: str) -> None:
        """Where this mount runs: start-up recovery removes the unfinished files of its own
        earlier sessions there (they crashed), never a live one's."""
        ...

    def live_sessions(self, timeout: float | None = None) -> list[SessionInfo]:
        """The mounts serving this manifest that beat within `timeout` seconds."""
        ...

    def unpublished_is_mine(self, node_id: int) -> bool:
        """Whether this mount may drop the unfinished file: only one it created itself."""
        ...

    def pin(self, digest: str) -> int:
        """Before a publish looks for, stores and references this content: no gc on any
        host deletes its blob until unpin(). Answers the pin's token (for unpin and
        NewVersion.pin)."""
        ...

    def unpin(self, digest: str, pin: int) -> None:
        """The pin goes; on PostgreSQL with this manifest's next statement (in its round
        trip), or at send_pending; nothing to send if it went with its connection."""
        ...

    def has_pending(self) -> bool:
        """Something waits for this manifest's next statement (an unpin); never waits."""
        ...

    def send_pending(self) -> None:
        """Send what waits for this manifest's next statement (unpins), if anything does: the
        daemon calls it when its connection has been idle a moment. No-op on SQLite."""
        ...

    def gc_lock(self) -> bool:
        """Take the store-wide gc lock; False if another gc holds it."""
        ...

    def gc_unlock(self) -> None: ...

    def lock_for_delete(self, digests: list[str]) -> list[str]:
        """The digests no host pins, locked against pins until unlock_deleted()."""
        ...

    def unlock_deleted(self, digests: list[str]) -> None: ...

    def set_gc_grace(self, seconds: float) -> None:
        """gc deletes a blob only once its last reference went this long ago."""
        ...


class Manifest(Namespace, Writers, Content, Maintenance, Import, Sharing, Protocol):
    """The whole manifest: what a store hands to the filesystem core and the admin code."""
