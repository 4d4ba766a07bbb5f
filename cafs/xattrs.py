"""Extended attributes: the user tags people set, and the read-only user.cafs.* attributes.

Owns: which nodes carry tags and within what limits (cafs.rules), the names and values of the
virtual attributes (sha256, size, ..., version, root), who may read the ones about sharing
(cafs.visibility), and one answer for names outside user.*: EOPNOTSUPP from every call. Must not
change anything but tags, and must not import pyfuse3 or trio.

Concurrency rule: synchronous, so each call is one atomic manifest change.
"""

from __future__ import annotations

import time

from cafs.blobstore import SpaceGuard
from cafs.errors import (
    AccessDenied,
    BadName,
    NoAttribute,
    NotPermitted,
    NotSupported,
    OutOfSpace,
)
from cafs.manifest import Manifest
from cafs.model import Caller, Kind, Node
from cafs.namespace import ROW_COST, Namespace, refuse_fixed_change
from cafs.rules import USER_PREFIX, XATTR_PREFIX, tag_space_left
from cafs.visibility import Visibility

# Read-only xattrs every artifact (and blob) carries; artifacts also carry user.cafs.version.
VIRTUAL_XATTRS = ("sha256", "size", "stored_size", "encoding", "refcount")
# Facts about which contents other artifacts hold as well: only for callers who see sharing
# (see Visibility.sees_sharing).
SHARING_XATTRS = ("refcount",)


def _has_tags(node: Node) -> bool:
    return node.kind in (Kind.EXECUTION, Kind.LAYER, Kind.DIR, Kind.FILE)


def _xattr_name(raw: bytes, setting: bool = False) -> str:
    """The name of a user.* attribute. cafs keeps no other: EOPNOTSUPP (not ENODATA, EPERM
    or EROFS) for those, from get, set and remove alike, lets tools such as ls remember that
    for the whole mount instead of asking for security.selinux and system.posix_acl_access on
    every file (two round trips per entry of `ls -l`). A name that is not UTF-8 is never kept:
    setting one is EILSEQ (as a file name is), getting or removing one ENODATA."""
    if not raw.startswith(USER_PREFIX.encode()):
        raise NotSupported("only user.* attributes are kept")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if setting:
            raise BadName("attribute names must be UTF-8") from None
        raise NoAttribute("attribute names must be UTF-8") from None


class Xattrs:
    def __init__(self, tree: Namespace, visibility: Visibility, manifest: Manifest,
                 space: SpaceGuard) -> None:
        self.tree = tree
        self.visibility = visibility
        self.manifest = manifest
        self.space = space

    def getxattr(self, ino: int, raw_name: bytes, caller: Caller | None = None) -> bytes:
        name = _xattr_name(raw_name)
        node = self.tree.node(ino)
        if name.startswith(XATTR_PREFIX):
            return self._virtual(node, name[len(XATTR_PREFIX):], caller)
        if _has_tags(node):
            value = self.manifest.tag(ino, name)
            if value is not None:
                return value
        raise NoAttribute(name)

    def listxattr(self, ino: int, caller: Caller | None = None) -> list[bytes]:
        node = self.tree.node(ino)
        names = []
        # The kernel answers user.* on a symlink itself (ENODATA): list nothing it would refuse.
        if node.blob is not None and node.kind is not Kind.SYMLINK:
            sharing = self.visibility.sees_sharing(caller)
            names = [f"{XATTR_PREFIX}{key}" for key in VIRTUAL_XATTRS
                     if sharing or key not in SHARING_XATTRS]
        if node.kind is Kind.FILE and node.version_id is not None:
            names.append(f"{XATTR_PREFIX}version")
        if node.kind is Kind.EXECUTION and self.visibility.shows_root(node, caller):
            names.append(f"{XATTR_PREFIX}root")
        if _has_tags(node):
            names += self.manifest.tag_names(ino)
        return [name.encode() for name in names]

    def setxattr(self, ino: int, raw_name: bytes, value: bytes) -> None:
        name = _xattr_name(raw_name, setting=True)
        node = self._changeable(ino, name)
        names_bytes, values_bytes = self.manifest.tag_usage(ino, excluding=name)
        if not tag_space_left(names_bytes + len(raw_name) + 1, values_bytes + len(value)):
            raise OutOfSpace(f"no room for more tags on {node.name}")
        # The value is stored twice: in the row and in the (name, value) index of find --tag.
        self.space.take_metadata(ROW_COST + 2 * (len(raw_name) + len(value)))
        self.manifest.set_tag(ino, name, bytes(value), time.time_ns())
        self.tree.cache.drop(ino)

    def removexattr(self, ino: int, raw_name: bytes) -> None:
        name = _xattr_name(raw_name)
        self._changeable(ino, name)
        if not self.manifest.remove_tag(ino, name, time.time_ns()):
            raise NoAttribute(name)
        self.tree.cache.drop(ino)

    def _changeable(self, ino: int, name: str) -> Node:
        """The node whose tag `name` may be set or removed."""
        node = self.tree.node(ino)
        refuse_fixed_change(node)
        self.tree.check_unsealed(node)
        if name.startswith(XATTR_PREFIX):
            raise NotPermitted(f"{name} is read-only")
        return node

    def _virtual(self, node: Node, key: str, caller: Caller | None) -> bytes:
        if key == "version" and node.kind is Kind.FILE and node.version_id is not None:
            return str(self.manifest.version_number(node.version_id)).encode()
        if key == "root" and node.kind is Kind.EXECUTION and node.sealed_ns is not None:
            if not self.visibility.shows_root(node, caller):
                raise AccessDenied(f"{XATTR_PREFIX}root is shown only to who may read every "
                                   "file of the run")
            root = self.manifest.root_of(node.ino)
            if root is not None:
                return root.encode()
        blob = node.blob
        if blob is None or key not in VIRTUAL_XATTRS:
            raise NoAttribute(f"{XATTR_PREFIX}{key}")
        if key in SHARING_XATTRS and not self.visibility.sees_sharing(caller):
            raise AccessDenied(f"{XATTR_PREFIX}{key} is shown only to root and the user who "
                               "mounted the store")
        if key == "refcount":
            return str(self.manifest.refcount(blob.blob_id)).encode()
        value = {"sha256": blob.digest, "size": blob.size, "stored_size": blob.stored_size,
                 "encoding": blob.encoding}[key]
        return str(value).encode()
