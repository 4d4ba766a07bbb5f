"""Records shared by the layers: node kinds, inode numbers, attributes. Stdlib only.

Owns: the shape of the namespace (which kind of node may live under which) and the fixed inode
numbers. Must not do I/O.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from enum import StrEnum

from cafs.digest import Digest

ROOT_INODE = 1  # the mount point itself (pyfuse3.ROOT_INODE)
RUNS_INODE = 2  # <mount>/runs
BLOBS_INODE = 3  # <mount>/blobs
# Manifest node ids (the inodes under runs/) start above the fixed ones; see schema.py.
FIRST_NODE_ID = 16
# /blobs/<sha256> entries get inode BLOB_INODE_BASE + blobs.id, far above any node id.
BLOB_INODE_BASE = 1 << 48

MAX_NAME_BYTES = 255


class Kind(StrEnum):
    ROOT = "root"
    RUNS = "runs"
    BLOBS = "blobs"
    BLOB = "blob"  # read-only view of one blob under blobs/
    EXECUTION = "execution"
    LAYER = "layer"
    DIR = "dir"  # a sub-directory inside a layer
    FILE = "file"  # an artifact

    @property
    def is_dir(self) -> bool:
        return self not in (Kind.FILE, Kind.BLOB)

    def child_kind(self, want_dir: bool) -> Kind | None:
        """The kind a new child of this directory gets, or None if none may be made here."""
        if self is Kind.RUNS:
            return Kind.EXECUTION if want_dir else None
        if self is Kind.EXECUTION:
            return Kind.LAYER if want_dir else None
        if self in (Kind.LAYER, Kind.DIR):
            return Kind.DIR if want_dir else Kind.FILE
        return None


@dataclass(frozen=True, slots=True)
class BlobRef:
    """One stored content, as the manifest records it."""

    blob_id: int
    digest: Digest
    size: int
    stored_size: int
    encoding: str


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A content just written to the blob store (or found there): what the manifest records."""

    digest: Digest
    size: int
    stored_size: int
    encoding: str


@dataclass(frozen=True, slots=True)
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

    @property
    def size(self) -> int:
        return self.blob.size if self.blob else 0

    @property
    def st_mode(self) -> int:
        return (stat.S_IFDIR if self.kind.is_dir else stat.S_IFREG) | self.mode


@dataclass(frozen=True, slots=True)
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
