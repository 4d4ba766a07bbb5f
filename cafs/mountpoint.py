"""Mountpoints as the kernel sees them: whether a directory can take a mount, what is mounted
where (/proc/self/mountinfo).

Owns: the checks `cafs mount` makes before it starts a daemon and the daemon makes again before
it mounts, and the reading of the mount table for `cafs umount` and the admin commands. Must not
import pyfuse3, trio or the daemon: the CLI uses it without mounting anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from cafs.errors import MountError


def check_mountpoint(mountpoint: Path, *, nonempty: bool = False) -> None:
    """Refuse a mountpoint that is missing, a dead mount, or (unless `nonempty`) already
    mounted or holding files: a mount there would hide them, or stack on another mount, and a
    user would not notice until they look for their files."""
    try:
        if not mountpoint.is_dir():
            raise MountError(f"mountpoint {mountpoint} does not exist or is not a directory",
                             errno.ENOENT)
        # stat alone can be answered from the attributes a dead FUSE mount still caches (and
        # a new mount would then be stacked on the dead one): opening the directory must ask.
        has_entries = False
        with contextlib.suppress(PermissionError), os.scandir(mountpoint) as entries:
            has_entries = next(entries, None) is not None
        if nonempty:
            return
        mounted = find_mount(mountpoint)
        if mounted is not None:
            raise MountError(f"mountpoint {mountpoint} is already mounted ({mounted[0]} "
                             f"{mounted[1]}); unmount it first, or mount with --nonempty to "
                             "stack on it", errno.EBUSY)
        if has_entries:
            raise MountError(f"mountpoint {mountpoint} is not empty: the mount would hide its "
                             "files; empty it, or mount with --nonempty", errno.ENOTEMPTY)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(f"mountpoint {mountpoint} is a dead mount (transport endpoint not "
                             f"connected): run 'cafs umount {mountpoint}' first",
                             errno.ENOTCONN) from None
        raise MountError(f"mountpoint {mountpoint}: {exc.strerror}", exc.errno) from None


def _mounts() -> list[tuple[Path, str, str]]:
    """(mountpoint, fstype, source) of every mount, bottom to top, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            separator = fields.index("-")
            found.append((Path(_unescape(fields[4])), fields[separator + 1],
                          _unescape(fields[separator + 2])))
    return found


def find_mount(mountpoint: Path) -> tuple[str, str] | None:
    """(fstype, source) of the mount at mountpoint (the one on top)."""
    target = mountpoint.absolute()
    found = None
    for point, fstype, source in _mounts():
        if point == target:
            found = (fstype, source)
    return found


def mounts_of_type(fstype: str) -> list[tuple[Path, str]]:
    """(mountpoint, source) of every mount of one type."""
    return [(point, source) for point, kind, source in _mounts() if kind == fstype]


def _unescape(text: str) -> str:
    return text.encode().decode("unicode_escape").encode("latin-1").decode()
