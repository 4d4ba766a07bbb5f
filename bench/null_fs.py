"""The floor: a pyfuse3 filesystem that does nothing per request, measured like cafs.

Directories and files live in a dict; a write only adds its length to the file's size (its
bytes are dropped), flush/fsync/release do nothing. Whatever the write figures show for this
mount is what FUSE plus pyfuse3's event loop cost on this machine: no filesystem written in
pyfuse3 can do better. Run: python bench/null_fs.py MOUNTPOINT (unmount with fusermount3 -u).
With --keep-bytes, writes are copied into a temp file (pwrite), the least a store must do.
"""

from __future__ import annotations

import argparse
import itertools
import os
import stat
import tempfile
import time

import pyfuse3
import trio


class NullFs(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, keep_bytes: bool) -> None:
        super().__init__()
        self.keep_bytes = keep_bytes
        self.numbers = itertools.count(pyfuse3.ROOT_INODE + 1)
        self.handles = itertools.count(1)
        self.children: dict[int, dict[bytes, int]] = {pyfuse3.ROOT_INODE: {}}
        self.sizes: dict[int, int] = {}
        self.fds: dict[int, int] = {}
        self.scratch = tempfile.mkdtemp(prefix="nullfs-")

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        out = pyfuse3.EntryAttributes()
        out.st_ino = ino
        is_dir = ino in self.children
        out.st_mode = (stat.S_IFDIR | 0o755) if is_dir else (stat.S_IFREG | 0o644)
        out.st_nlink = 2 if is_dir else 1
        out.st_size = self.sizes.get(ino, 0)
        out.st_blksize = 1 << 20  # as cafs (cafs.ops.BLOCK_SIZE): cp writes 1 MiB at once
        out.entry_timeout = out.attr_timeout = 300
        now = time.time_ns()
        out.st_atime_ns = out.st_mtime_ns = out.st_ctime_ns = now
        out.st_uid, out.st_gid = os.getuid(), os.getgid()
        return out

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ino = self.children.get(parent_inode, {}).get(name)
        if ino is None:  # a negative entry the kernel keeps, as cafs answers (cafs.ops.absent)
            out = pyfuse3.EntryAttributes()
            out.st_ino = 0
            out.entry_timeout = 300
            return out
        return self._attr(ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            self.sizes[inode] = attr.st_size
        return self._attr(inode)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ino = next(self.numbers)
        self.children[ino] = {}
        self.children[parent_inode][name] = ino
        return self._attr(ino)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(self.children[fh].items())
        for index, (name, ino) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), index):
                break

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        ino = next(self.numbers)
        self.children[parent_inode][name] = ino
        self.sizes[ino] = 0
        fh = next(self.handles)
        if self.keep_bytes:
            self.fds[fh] = os.open(os.path.join(self.scratch, str(fh)),
                                   os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        return pyfuse3.FileInfo(fh=fh | ino << 32), self._attr(ino)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=next(self.handles) | inode << 32)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        ino = fh >> 32
        fd = self.fds.get(fh & 0xFFFFFFFF)
        if fd is not None:
            os.pwrite(fd, buf, off)
        self.sizes[ino] = max(self.sizes.get(ino, 0), off + len(buf))
        return len(buf)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return b""

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.children[parent_inode].pop(name, None)

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        fd = self.fds.pop(fh & 0xFFFFFFFF, None)
        if fd is not None:
            os.close(fd)
            os.unlink(os.path.join(self.scratch, str(fh & 0xFFFFFFFF)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mountpoint")
    parser.add_argument("--keep-bytes", action="store_true")
    parser.add_argument("--writeback", action="store_true",
                        help="ask for the kernel's writeback cache (FUSE_CAP_WRITEBACK_CACHE)")
    args = parser.parse_args()
    operations = NullFs(args.keep_bytes)
    operations.enable_writeback_cache = args.writeback
    # The mount options of cafs (cafs.daemon.fuse_options), so the floor pays what cafs pays.
    pyfuse3.init(operations, args.mountpoint,
                 {"fsname=nullfs", "subtype=nullfs", "default_permissions", "nodev", "nosuid",
                  "noatime"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
