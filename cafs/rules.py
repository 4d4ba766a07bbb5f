"""What the namespace accepts: names, modes, tags and sizes. Stdlib only.

Owns: the rules a name, a mode or a tag must meet wherever it comes from — a FUSE request
(cafs.namespace) or a bundle from another store (cafs.bundle) — so an import can never hold
what the mount would have refused. Which kind of node may live where is Kind.child_kind
(cafs.model). Must not do I/O.
"""

from __future__ import annotations

import stat

from cafs.errors import BadName, InvalidArgument, NameTooLong, NotFound, OutOfSpace
from cafs.model import MAX_NAME_BYTES, MAX_SYMLINK_TARGET

# Refuses what is surely a mistake (truncate -s 1T would make the daemon hash a terabyte of
# zeros); raise it with max_artifact_size for larger artifacts.
DEFAULT_MAX_ARTIFACT_SIZE = 256 << 30
# User tags per artifact or directory, like ext4's per-inode xattr space (ENOSPC beyond): the
# names must fit listxattr's 64 KiB buffer with the user.cafs.* names, the values 1 MiB.
TAG_NAMES_BYTES = 60 * 1024
TAG_VALUES_BYTES = 1 << 20
# One xattr: the kernel stops longer names (ERANGE) and values (E2BIG) before they reach the
# daemon (XATTR_NAME_MAX, XATTR_SIZE_MAX); a bundle has no kernel in the way.
TAG_NAME_MAX = 255
TAG_VALUE_MAX = 64 * 1024
USER_PREFIX = "user."
XATTR_PREFIX = "user.cafs."
# What stat's fields hold (and SQLite's INTEGER): times are signed 64-bit nanoseconds, ids are
# 32-bit (and (uid_t)-1 means "no change", never an owner).
TIME_MIN, TIME_MAX = -(1 << 63), (1 << 63) - 1
ID_MAX = (1 << 32) - 2


def new_name(raw: bytes) -> str:
    """A name for a new directory or artifact: at most 255 bytes of UTF-8, no '/', no NUL,
    not '.' or '..'."""
    if len(raw) > MAX_NAME_BYTES:
        raise NameTooLong(f"names are at most {MAX_NAME_BYTES} bytes")
    if not raw or b"/" in raw or b"\0" in raw or raw in (b".", b".."):
        raise InvalidArgument("invalid name")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadName("names must be valid UTF-8") from None


def file_mode(mode: int) -> int:
    # Artifacts are data: no setuid/setgid bits, whoever asks (the mount is nosuid as well).
    return mode & 0o7777 & ~(stat.S_ISUID | stat.S_ISGID)


def tag_space_left(names_bytes: int, values_bytes: int) -> bool:
    """Whether a node's tags fit: `names_bytes` counts each name with its NUL (as listxattr
    returns them), `values_bytes` the values."""
    return names_bytes <= TAG_NAMES_BYTES and values_bytes <= TAG_VALUES_BYTES


def check_user_tag(name: str, value: bytes) -> None:
    """One user tag as setxattr through the kernel would take it; raises CafsError."""
    if not name.startswith(USER_PREFIX):
        raise InvalidArgument(f"tag {name!r} is not a user tag (user.*)")
    if name.startswith(XATTR_PREFIX):
        raise InvalidArgument(f"tag {name!r} is one of cafs's own, read-only attributes")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadName(f"tag {name!r}: names must be valid UTF-8") from None
    if len(raw) > TAG_NAME_MAX or "\0" in name:
        raise NameTooLong(f"tag {name[:40]!r}...: names are at most {TAG_NAME_MAX} bytes, "
                          "without NUL")
    if len(value) > TAG_VALUE_MAX:
        raise OutOfSpace(f"tag {name!r}: {len(value)} bytes, values are at most "
                         f"{TAG_VALUE_MAX}")


def check_tags(tags: dict[str, bytes]) -> None:
    """All the user tags of one node, as successive setxattr calls would have to take them."""
    for name, value in tags.items():
        check_user_tag(name, value)
    names = sum(len(name.encode()) + 1 for name in tags)
    values = sum(len(value) for value in tags.values())
    if not tag_space_left(names, values):
        raise OutOfSpace(f"{names} bytes of tag names and {values} of values; a node holds "
                         f"at most {TAG_NAMES_BYTES} and {TAG_VALUES_BYTES}")


def check_target(target: bytes) -> None:
    """A target as symlink(2) takes it on ext4: not empty, at most 4095 bytes, no NUL."""
    if not target:
        raise NotFound("a symlink's target cannot be empty")
    if len(target) > MAX_SYMLINK_TARGET:
        raise NameTooLong(f"symlink targets are at most {MAX_SYMLINK_TARGET} bytes")
    if b"\0" in target:
        raise InvalidArgument("a symlink's target cannot hold NUL")
