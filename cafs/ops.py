"""The pyfuse3 adapter: translate requests to Vfs calls and results back. Decides nothing.

Owns: the conversion of pyfuse3 types (EntryAttributes, FileInfo, SetattrFields, ...) and the one
place where errors become FUSEError. Only FUSEError may leave a handler: anything else would end
pyfuse3.main() and leave a dead mount, so an unexpected exception is logged with its traceback and
answered with EIO.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3

from cafs.errors import CafsError, Damaged
from cafs.model import BLOB_INODE_BASE, MAX_NAME_BYTES, Attr, AttrChanges, Caller
from cafs.vfs import Vfs

log = logging.getLogger(__name__)

# Content behind an inode changes only through this daemon, which invalidates the kernel's
# caches when it does: so the kernel may keep entries and attributes for a long time.
ENTRY_TIMEOUT = 300.0
ATTR_TIMEOUT = 300.0
# A shared manifest (several hosts): names and attributes under runs/ change on other hosts.
# The change feed invalidates them within milliseconds; this bounds what a lost notification
# or a reconnect can leave stale (new and removed names show within a second). blobs/<sha256>
# never changes: it keeps the long ones.
SHARED_TIMEOUT = 1.0
# st_blksize: what cp, Python's buffered files and friends use as their I/O size. 1 MiB, the
# largest WRITE the kernel sends us (max_write): `cp` of a file up to 1 MiB is then one WRITE
# request, not eight of 128 KiB, and every request costs a round trip through the daemon.
BLOCK_SIZE = 1 << 20
# Replies made for an Attr are kept with it (the namespace hands out the same Attr object while a
# node is unchanged): `ls -l` and `find` of a big directory convert each entry once. Bounded.
ENTRY_MEMO = 32_768  # ~200 bytes each

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def translated(handler: F) -> F:
    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%s", handler.__name__, _brief(args[1:]))
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Damaged as exc:  # known and already reported by fsck --repair
            log.warning("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except CafsError as exc:
            if exc.errno == errno.EIO:
                log.error("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:  # the store's disk failed us; the caller gets its errno
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s: unexpected error", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _brief(args: tuple[Any, ...]) -> str:
    """Request arguments for the debug log, without megabytes of write data."""
    shown = [f"<{len(a)} bytes>" if isinstance(a, bytes) and len(a) > 64 else repr(a)
             for a in args if not isinstance(a, pyfuse3.RequestContext)]
    return "(" + ", ".join(shown) + ")"


def entry(attr: Attr, shared: bool = False) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.st_ino = attr.ino
    out.generation = 0
    # A computed file (a record) changes with the manifest: the kernel must ask every time.
    if attr.volatile:
        out.entry_timeout = out.attr_timeout = 0
    elif shared and attr.ino < BLOB_INODE_BASE:
        out.entry_timeout = out.attr_timeout = SHARED_TIMEOUT
    else:
        out.entry_timeout, out.attr_timeout = ENTRY_TIMEOUT, ATTR_TIMEOUT
    out.st_mode = attr.mode
    out.st_nlink = attr.nlink
    out.st_uid = attr.uid
    out.st_gid = attr.gid
    out.st_rdev = 0
    out.st_size = attr.size
    out.st_blksize = BLOCK_SIZE
    out.st_blocks = attr.blocks
    out.st_atime_ns = attr.mtime_ns if attr.atime_ns is None else attr.atime_ns
    out.st_mtime_ns = attr.mtime_ns
    out.st_ctime_ns = attr.ctime_ns
    return out


def absent(shared: bool = False) -> pyfuse3.EntryAttributes:
    """A negative entry: inode 0 with a timeout makes the kernel remember that the name does
    not exist (instead of asking again at every open or stat of it)."""
    out = pyfuse3.EntryAttributes()
    out.st_ino = 0
    out.entry_timeout = SHARED_TIMEOUT if shared else ENTRY_TIMEOUT
    return out


_callers: dict[tuple[int, int, int, int], Caller] = {}


def caller(ctx: pyfuse3.RequestContext) -> Caller:
    """The request's Caller, one object per (uid, gid, pid, umask) seen lately: a frozen
    dataclass costs ~2 us to build, more than the rest of an OPEN. Bounded."""
    key = (ctx.uid, ctx.gid, ctx.pid, ctx.umask)
    known = _callers.get(key)
    if known is None:
        if len(_callers) >= 4096:
            _callers.clear()
        known = _callers[key] = Caller(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid, umask=ctx.umask)
    return known


class CafsOperations(pyfuse3.Operations):
    enable_writeback_cache = False  # publish-on-close needs every write to reach us first

    def __init__(self, vfs: Vfs) -> None:
        super().__init__()
        self.vfs = vfs
        self.shared = vfs.shared
        self._entries: dict[int, tuple[Attr, pyfuse3.EntryAttributes]] = {}

    def entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        """entry(attr), made once per Attr object: pyfuse3 only copies it into replies."""
        memo = self._entries.get(attr.ino)
        if memo is not None and memo[0] is attr:
            return memo[1]
        out = entry(attr, self.shared)
        if not attr.volatile:
            if len(self._entries) >= ENTRY_MEMO:
                self._entries.clear()
            self._entries[attr.ino] = (attr, out)
        return out

    @translated
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        attr = self.vfs.lookup_entry(parent_inode, name, caller(ctx))
        return self.entry(attr) if attr is not None else absent(self.shared)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # nothing to free: see the module docstring of cafs.vfs

    @translated
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.entry(self.vfs.getattr(inode, caller(ctx)))

    @translated
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        changes = AttrChanges(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
        )
        return entry(await self.vfs.setattr(inode, changes, fh, caller(ctx)), self.shared)

    @translated
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry(self.vfs.mkdir(parent_inode, name, mode, caller(ctx)), self.shared)

    @translated
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        fh, attr = await self.vfs.create(parent_inode, name, mode, flags, caller(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), entry(attr, self.shared)

    @translated
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)  # artifacts are regular files only

    @translated
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry(self.vfs.symlink(parent_inode, name, target, caller(ctx)), self.shared)

    @translated
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.vfs.readlink(inode)

    @translated
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry(self.vfs.link(inode, new_parent_inode, new_name), self.shared)

    @translated
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.vfs.unlink(parent_inode, name)

    @translated
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.vfs.rmdir(parent_inode, name)

    @translated
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self.vfs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @translated
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        # keep_cache: the kernel sees every change of content (writes go through it; admin
        # commands that change things behind it invalidate the inode), so cached pages stay
        # right across opens. On a shared manifest, only while they are of the version this
        # open serves (Vfs.page_cache).
        fh = await self.vfs.open(inode, flags, caller(ctx))
        if self.vfs.is_computed(inode):  # its bytes are fixed per open: no page cache at all
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        keep, direct = self.vfs.page_cache(fh)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=direct)

    @translated
    async def read(self, fh: int, off: int, size: int) -> bytes:
        # A memoryview (of a stream's buffer, see raw_xxh64) is sent as it is: pyfuse3 replies
        # with any buffer, before anything else runs on the event loop.
        return await self.vfs.read(fh, off, size)  # type: ignore[return-value]

    @translated
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.vfs.write(fh, off, buf)

    @translated
    async def flush(self, fh: int) -> None:
        await self.vfs.flush(fh)

    @translated
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.vfs.fsync(fh)

    @translated
    async def release(self, fh: int) -> None:
        await self.vfs.publish_and_release(fh)

    @translated
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self.vfs.opendir(inode)

    @translated
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, attr, next_id in self.vfs.readdir_handle(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self.entry(attr), next_id):
                break

    @translated
    async def releasedir(self, fh: int) -> None:
        self.vfs.releasedir(fh)

    @translated
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        fs = self.vfs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = fs.f_bsize
        out.f_frsize = fs.f_frsize
        out.f_blocks = fs.f_blocks
        out.f_bfree = fs.f_bfree
        out.f_bavail = fs.f_bavail
        out.f_files = fs.f_files
        out.f_ffree = fs.f_ffree
        out.f_favail = fs.f_favail
        out.f_namemax = MAX_NAME_BYTES
        return out

    @translated
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.vfs.getxattr(inode, name, caller(ctx))

    @translated
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.vfs.listxattr(inode, caller(ctx))

    @translated
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        self.vfs.setxattr(inode, name, value)

    @translated
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.vfs.removexattr(inode, name)
