"""The floor of the read figures: a read-only pyfuse3 passthrough of a plain directory that does
the least any pyfuse3 filesystem can per request, with every reply option cafs uses.

Usage: python bench/floor_fs.py [--no-flush] SOURCE MOUNTPOINT   (serves until unmounted:
fusermount3 -u). --no-flush: no FLUSH handler (the kernel then sends none, as FOPEN_NOFLUSH would
for read-only opens, which pyfuse3 3.5 cannot ask for): what that round trip costs.

Same as cafs: the mount options of cafs.daemon.fuse_options (default_permissions, nodev, nosuid,
noatime, fsname, subtype), pyfuse3.main() with its defaults, keep_cache at every open, 300 s entry
and attribute timeouts, negative entries, READDIRPLUS with full attributes, st_blksize of
cafs.ops.BLOCK_SIZE (it sets cat's buffer), a FLUSH handler (cafs needs FLUSH to publish), the
kernel read-ahead cafs sets (cafs.daemon.raise_read_ahead). Less than cafs: attributes and
listings are taken from the source once and kept in memory, a READ is one os.pread on the event
loop (no checksum, no decompression, no thread), OPEN opens the source file and RELEASE closes
it. Whatever cafs does beyond this is its own cost; what this costs over the plain directory is
FUSE's and pyfuse3's, and no pyfuse3 filesystem beats it.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cafs.daemon import raise_read_ahead
from cafs.ops import ATTR_TIMEOUT, BLOCK_SIZE, ENTRY_TIMEOUT


class PassthroughFs(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, source: Path) -> None:
        super().__init__()
        self.paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: os.fsencode(source)}
        self.inos: dict[bytes, int] = {os.fsencode(source): pyfuse3.ROOT_INODE}
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.listings: dict[int, list[tuple[bytes, int]]] = {}
        self.fds: dict[int, int] = {}
        self.next_fh = 1

    def _ino(self, path: bytes) -> int:
        ino = self.inos.get(path)
        if ino is None:
            ino = len(self.paths) + pyfuse3.ROOT_INODE
            self.paths[ino], self.inos[path] = path, ino
        return ino

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        out = self.attrs.get(ino)
        if out is None:
            st = os.lstat(self.paths[ino])
            out = pyfuse3.EntryAttributes()
            out.st_ino = ino
            out.entry_timeout, out.attr_timeout = ENTRY_TIMEOUT, ATTR_TIMEOUT
            out.st_mode, out.st_nlink = st.st_mode, st.st_nlink
            out.st_uid, out.st_gid, out.st_size = st.st_uid, st.st_gid, st.st_size
            out.st_blksize, out.st_blocks = BLOCK_SIZE, st.st_blocks
            out.st_atime_ns, out.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
            out.st_ctime_ns = st.st_ctime_ns
            self.attrs[ino] = out
        return out

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        path = os.path.join(self.paths[parent_inode], name)
        try:
            return self._attr(self._ino(path))
        except FileNotFoundError:
            self.paths.pop(self.inos.pop(path))
            absent = pyfuse3.EntryAttributes()
            absent.st_ino, absent.entry_timeout = 0, ENTRY_TIMEOUT
            return absent

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.listings.get(fh)
        if listing is None:
            base = self.paths[fh]
            listing = [(name, self._ino(os.path.join(base, name)))
                       for name in sorted(os.listdir(base))]
            self.listings[fh] = listing
        for position in range(start_id, len(listing)):
            name, ino = listing[position]
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), position + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.fds[fh] = os.open(self.paths[inode], os.O_RDONLY)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.fds[fh], size, off)

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        os.close(self.fds.pop(fh))

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # as cafs answers names outside user.*: ls then stops asking for ACLs and labels
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP if not name.startswith(b"user.")
                                else pyfuse3.ENOATTR)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st, out = os.statvfs(self.paths[pyfuse3.ROOT_INODE]), pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail"):
            setattr(out, field, getattr(st, field))
        out.f_namemax = 255
        return out


async def serve(mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        # as cafs does once it serves (cafs.daemon._announce_ready)
        raise_read_ahead((await trio.to_thread.run_sync(os.stat, mountpoint)).st_dev)


def main() -> None:
    args = sys.argv[1:]
    if args[0] == "--no-flush":  # pyfuse3's default handler answers ENOSYS: FLUSH never again
        del PassthroughFs.flush
        args = args[1:]
    source, mountpoint = Path(args[0]).resolve(), args[1]
    options = {"default_permissions", "nodev", "nosuid", "noatime", "subtype=floor",
               f"fsname={source}"}
    pyfuse3.init(PassthroughFs(source), mountpoint, options)
    try:
        trio.run(serve, mountpoint)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
