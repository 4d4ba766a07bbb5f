"""Records shared by the layers: node kinds, inode numbers, attributes. Stdlib only.

Owns: the shape of the namespace (which kind of node may live under which) and the fixed inode
numbers. Must not do I/O.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar, dataclass_transform

from cafs.digest import Digest

ROOT_INODE = 1  # the mount point itself (pyfuse3.ROOT_INODE)
RUNS_INODE = 2  # <mount>/runs
BLOBS_INODE = 3  # <mount>/blobs
# Manifest node ids (the inodes under runs/) start above the fixed ones; see schema.py.
FIRST_NODE_ID = 16
# /blobs/<sha256> entries get inode BLOB_INODE_BASE + blobs.id, far above any node id.
BLOB_INODE_BASE = 1 << 48
# <dir>/.record.json (layers and executions) gets inode RECORD_INODE_BASE + the directory's id.
RECORD_INODE_BASE = 1 << 47
RECORD_NAME = ".record.json"

_Record = TypeVar("_Record")


@dataclass_transform(frozen_default=True)
def hot_record(cls: type[_Record]) -> type[_Record]:
    """A frozen dataclass to the type checker (an assignment to a field is an error), made
    without frozen's guard at run time, and hashed by its fields as a frozen one is.

    Why: frozen's __init__ sets each field through object.__setattr__, which made a Node cost
    1.7 us against 0.3 us without (measured). A node, its blob and its attributes are made
    for every entry of a listing and every lookup: `ls -l` of 10,000 entries spent ~40 ms of
    the daemon's CPU on those three constructors alone.
    """
    return dataclass(slots=True, unsafe_hash=True)(cls)


MAX_NAME_BYTES = 255
# A symlink's target: PATH_MAX (4096) less the NUL, as ext4 and tmpfs take it; longer targets
# are ENAMETOOLONG (the kernel stops them at the mount; a bundle has no kernel in the way).
MAX_SYMLINK_TARGET = 4095
# What stat shows as a symlink's permission bits (Linux ignores them; chmod cannot change them).
SYMLINK_MODE = 0o777


class Kind(StrEnum):
    ROOT = "root"
    RUNS = "runs"
    BLOBS = "blobs"
    BLOB = "blob"  # read-only view of one blob under blobs/
    EXECUTION = "execution"
    LAYER = "layer"
    DIR = "dir"  # a sub-directory inside a layer
    FILE = "file"  # an artifact
    SYMLINK = "symlink"  # a symbolic link inside a layer; its target is versioned like content
    RECORD = "record"  # the virtual read-only .record.json of a layer or execution

    @property
    def is_dir(self) -> bool:
        return self not in _NOT_DIRS  # a set made once: asked at every stat and readdir entry

    @property
    def has_versions(self) -> bool:
        """Nodes whose content (a file's bytes, a symlink's target) is a blob with history."""
        return self in (Kind.FILE, Kind.SYMLINK)

    @property
    def has_record(self) -> bool:
        return self in (Kind.EXECUTION, Kind.LAYER)

    def child_kind(self, want_dir: bool) -> Kind | None:
        """The kind a new child of this directory gets, or None if none may be made here."""
        if self is Kind.RUNS:
            return Kind.EXECUTION if want_dir else None
        if self is Kind.EXECUTION:
            return Kind.LAYER if want_dir else None
        if self in (Kind.LAYER, Kind.DIR):
            return Kind.DIR if want_dir else Kind.FILE
        return None

    def accepts(self, kind: Kind) -> bool:
        """Whether a node of `kind` may live in this directory (made, moved or imported)."""
        if kind is Kind.SYMLINK:  # symlinks go where files go
            return self.child_kind(want_dir=False) is Kind.FILE
        return self.child_kind(kind.is_dir) is kind


_NOT_DIRS = frozenset((Kind.FILE, Kind.SYMLINK, Kind.BLOB, Kind.RECORD))


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One mount serving a manifest shared by several hosts (PostgreSQL only)."""

    session_id: int
    host: str
    mountpoint: str
    pid: int
    started_at: float  # seconds since the epoch, server clock
    beat_at: float  # its last heartbeat, server clock
    beat_age: float  # seconds since that beat, by the server's clock


@hot_record
class BlobRef:
    """One stored content, as the manifest records it."""

    blob_id: int
    digest: Digest
    size: int
    stored_size: int
    encoding: str
    damaged: bool = False  # fsck --repair found its file missing or wrong: reads give EIO


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A content just written to the blob store (or found there): what the manifest records."""

    digest: Digest
    size: int
    stored_size: int
    encoding: str
    fresh: bool = True  # its file was (re)written just now, so it is sound even if once damaged


@dataclass(frozen=True, slots=True)
class Version:
    """One publish of an artifact's content (a row of `versions`, with its blob's digest)."""

    version_id: int
    node_id: int
    path: str  # where it was published: runs/<exec>/<layer>/...
    digest: Digest
    size: int
    mode: int
    uid: int  # the writer
    gid: int
    mtime_ns: int
    ctime_ns: int
    content_type: str | None
    created_ns: int  # when it was published
    replaced_ns: int | None  # when something replaced it; None while current
    damaged: bool = False
    number: int = 0  # its number in its path's history (1..n, stable); 0 where not known


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """A directory or artifact of one execution, as export writes it and import reads it."""

    rel: str  # path below the execution, e.g. "train/model.bin"
    kind: Kind  # LAYER, DIR, FILE or SYMLINK
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    tags: dict[str, bytes]
    versions: tuple[Version, ...] = ()  # files and symlinks: oldest first; the last is current


@hot_record
class Node:
    """A directory or artifact as the manifest records it (or one of the fixed virtual nodes)."""

    ino: int
    parent: int
    name: str
    kind: Kind
    mode: int  # permission bits only; the file type comes from kind
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    version_id: int | None = None  # files: the current version; None until first published
    blob: BlobRef | None = None  # files and blobs: the current content
    sealed_ns: int | None = None  # executions: when the run was sealed (immutable)
    atime_ns: int | None = None  # as last set explicitly (m008); None: never set

    @property
    def size(self) -> int:
        return self.blob.size if self.blob else 0

    @property
    def st_mode(self) -> int:
        if self.kind is Kind.SYMLINK:
            return stat.S_IFLNK | SYMLINK_MODE
        return (stat.S_IFDIR if self.kind.is_dir else stat.S_IFREG) | self.mode


@hot_record
class Attr:
    """What stat shows for an inode."""

    ino: int
    mode: int  # full st_mode
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int  # 512-byte units actually stored (compressed size for blobs)
    mtime_ns: int
    ctime_ns: int
    volatile: bool = False  # computed on demand (records): the kernel must not cache it
    atime_ns: int | None = None  # None: never set, shown as mtime (reads never change it)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asked: from the FUSE request context."""

    uid: int
    gid: int
    pid: int = 0
    umask: int = 0o022


@dataclass(frozen=True, slots=True)
class AttrChanges:
    """A setattr request: None means "leave as is"."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    mtime_ns: int | None = None
    atime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """One row another mount changed in a shared manifest (its change feed): what the caches
    of this mount must forget. `what`: added, removed, changed (attributes or current
    version), moved (id = the node), tags (a node's user xattrs), blob (a content removed;
    id = blobs.id, name = its sha256), damage (a content marked damaged or healed)."""

    what: str
    id: int
    parent_id: int | None = None  # node: its directory after the change
    name: str | None = None  # node: its name after the change; blob: the sha256
    old_parent_id: int | None = None  # node moved or renamed: where it was
    old_name: str | None = None
