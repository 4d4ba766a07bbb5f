"""The floor: a pyfuse3 filesystem that does nothing per request, measured like cafs.

Directories and files live in a dict; a write only adds its length to the file's size (its
bytes are dropped), flush/fsync/release do nothing. Whatever the write figures show for this
mount is what FUSE plus pyfuse3's event loop cost on this machine: no filesystem written in
pyfuse3 can do better. Run: python bench/null_fs.py MOUNTPOINT (unmount with fusermount3 -u).
With --keep-bytes, writes are copied into a temp file (pwrite), the least a store must do.
With --journal, the least a store whose close() survives kill -9 must do, without a temp file:
a file's bytes are kept in memory and hashed (SHA-256) as they arrive, and its last close
appends one record (parent, name, size, digest, bytes) to an append-only journal with one
write(2). What it reaches bounds any Python daemon that publishes at close, however its
manifest and blobs are applied later. With --journal --apply, a thread also applies the
journaled closes as a store must, in groups: each content to a blob file named by its digest
(no fsync) and three rows (blob, node, version) to SQLite, one commit per group: the best case of
a write path that answers close() from the journal and applies it off the event loop.
With --hash, the least a content-addressed store must do with the bytes: each write's bytes are
hashed (SHA-256, the blob's name) as they arrive, and nothing is kept or stored; close() (FLUSH)
gets its file's digest. On the event loop: with the CPU's SHA extensions (~1,500 MB/s) a 128 KiB
WRITE hashes in ~85 us, less than handing it to a worker thread costs (measured, 5 rounds of the
ingest at load 5.7-7: the daemon's CPU 0.45-0.52 s per cp -r inline, 0.70-0.94 s in a thread).
With --hash --hash-thread, in one worker thread instead, in order, which the loop does not wait
for until FLUSH: more CPU, but the hashing overlaps with the writer's next write. The better of
the two is the bound.
What it reaches bounds any content-addressed daemon in Python on this machine, whatever it
stores and however.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import queue
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pyfuse3
import trio


class NullFs(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, scratch: str, keep_bytes: bool, journal: bool = False,
                 hash_only: bool = False, hash_thread: bool = False) -> None:
        super().__init__()
        self.hash_only = hash_only
        self.hashes: dict[int, hashlib._Hash] = {}  # --hash: handle -> the file's SHA-256
        self.hasher = (ThreadPoolExecutor(1, thread_name_prefix="null-sha256")
                       if hash_only and hash_thread else None)
        self.keep_bytes = keep_bytes
        self.numbers = itertools.count(pyfuse3.ROOT_INODE + 1)
        self.handles = itertools.count(1)
        self.children: dict[int, dict[bytes, int]] = {pyfuse3.ROOT_INODE: {}}
        self.sizes: dict[int, int] = {}
        self.fds: dict[int, int] = {}
        self.scratch = scratch
        self.names: dict[int, tuple[int, bytes]] = {}  # inode -> (parent, name), for --journal
        self.buffers: dict[int, tuple[bytearray, hashlib._Hash]] = {}  # handle -> bytes, hash
        self.journal = (os.open(os.path.join(self.scratch, "journal"),
                                os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                        if journal else None)
        self.applied: queue.SimpleQueue[tuple[int, bytes, bytes, str] | None] | None = None
        self.applier: threading.Thread | None = None

    def start_applying(self) -> None:
        """The --apply thread: journaled closes to blob files and SQLite rows, in groups."""
        self.applied = queue.SimpleQueue()
        self.applier = threading.Thread(target=self._apply, args=(self.applied,))
        self.applier.start()

    def stop_applying(self) -> None:
        """What was journaled is applied, then the thread ends."""
        if self.applied is not None and self.applier is not None:
            self.applied.put(None)
            self.applier.join()

    def _apply(self, closes: queue.SimpleQueue[tuple[int, bytes, bytes, str] | None]) -> None:
        db = sqlite3.connect(os.path.join(self.scratch, "manifest.sqlite"))
        db.executescript(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
            "CREATE TABLE blobs (id INTEGER PRIMARY KEY, sha256 TEXT UNIQUE, size INTEGER);"
            "CREATE TABLE nodes (id INTEGER PRIMARY KEY, parent INTEGER, name BLOB, "
            "version_id INTEGER, UNIQUE (parent, name));"
            "CREATE TABLE versions (id INTEGER PRIMARY KEY, node_id INTEGER, blob_id INTEGER,"
            " size INTEGER, mtime_ns INTEGER);")
        blobs = os.path.join(self.scratch, "blobs")
        while True:
            group = [closes.get()]  # what has come meanwhile, up to 256; None: stop after it
            while group[-1] is not None and len(group) < 256:
                try:
                    group.append(closes.get_nowait())
                except queue.Empty:
                    break
            stop = group[-1] is None
            with db:
                for parent, name, data, digest in filter(None, group):
                    path = os.path.join(blobs, digest[:2], digest)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
                    os.write(fd, data)
                    os.close(fd)
                    db.execute("INSERT OR IGNORE INTO blobs (sha256, size) VALUES (?, ?)",
                               (digest, len(data)))
                    node = db.execute("INSERT INTO nodes (parent, name) VALUES (?, ?) ON CONFLICT"
                                      " DO UPDATE SET name = name RETURNING id",
                                      (parent, name)).fetchone()[0]
                    version = db.execute(
                        "INSERT INTO versions (node_id, blob_id, size, mtime_ns) SELECT ?, id, ?, ?"
                        " FROM blobs WHERE sha256 = ? RETURNING id",
                        (node, len(data), time.time_ns(), digest)).fetchone()[0]
                    db.execute("UPDATE nodes SET version_id = ? WHERE id = ?", (version, node))
            if stop:
                return

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
        if self.hash_only:
            self.hashes[fh] = hashlib.sha256()
        if self.journal is not None:
            self.names[ino] = (parent_inode, name)
            self.buffers[fh] = (bytearray(), hashlib.sha256())
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
        digest = self.hashes.get(fh & 0xFFFFFFFF)
        if digest is not None and self.hasher is not None:  # one thread: in order
            self.hasher.submit(digest.update, buf)
        elif digest is not None:  # sequential writes, as kept below
            digest.update(buf)
        kept = self.buffers.get(fh & 0xFFFFFFFF)
        if kept is not None:  # sequential writes only: what the create and cp figures do
            kept[0][off:off + len(buf)] = buf
            kept[1].update(buf)
        self.sizes[ino] = max(self.sizes.get(ino, 0), off + len(buf))
        return len(buf)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return b""

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.children[parent_inode].pop(name, None)

    async def flush(self, fh: int) -> None:
        digest = self.hashes.get(fh & 0xFFFFFFFF)
        if digest is not None and self.hasher is not None:  # close() waits for the digest
            done: Future[str] = self.hasher.submit(digest.hexdigest)
            await trio.to_thread.run_sync(done.result)
        elif digest is not None:  # what a store names the blob by, when close() publishes
            digest.hexdigest()

    async def release(self, fh: int) -> None:
        self.hashes.pop(fh & 0xFFFFFFFF, None)
        kept = self.buffers.pop(fh & 0xFFFFFFFF, None)
        if kept is not None and self.journal is not None:
            parent, name = self.names[fh >> 32]
            data, digest = kept
            header = b"%d %d %d %s " % (parent, len(name), len(data), digest.hexdigest().encode())
            os.write(self.journal, header + name + bytes(data))
            if self.applied is not None:
                self.applied.put((parent, name, bytes(data), digest.hexdigest()))
        fd = self.fds.pop(fh & 0xFFFFFFFF, None)
        if fd is not None:
            os.close(fd)
            os.unlink(os.path.join(self.scratch, str(fh & 0xFFFFFFFF)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mountpoint")
    parser.add_argument("--scratch", help="where temp files, the journal and what --apply "
                        "writes go, kept (default: a temp directory, removed at exit)")
    parser.add_argument("--keep-bytes", action="store_true")
    parser.add_argument("--journal", action="store_true",
                        help="keep bytes in memory, hash them, append a record per last close")
    parser.add_argument("--apply", action="store_true",
                        help="with --journal: apply closes to blob files and SQLite in a thread")
    parser.add_argument("--hash", action="store_true",
                        help="hash each file's bytes (SHA-256) as they arrive, store nothing")
    parser.add_argument("--hash-thread", action="store_true",
                        help="with --hash: in a worker thread, not on the event loop")
    parser.add_argument("--writeback", action="store_true",
                        help="ask for the kernel's writeback cache (FUSE_CAP_WRITEBACK_CACHE)")
    args = parser.parse_args()
    scratch = args.scratch or tempfile.mkdtemp(prefix="nullfs-")
    os.makedirs(scratch, exist_ok=True)
    operations = NullFs(scratch, args.keep_bytes, args.journal, args.hash, args.hash_thread)
    if args.journal and args.apply:
        operations.start_applying()
    operations.enable_writeback_cache = args.writeback
    # The mount options of cafs (cafs.daemon.fuse_options), so the floor pays what cafs pays.
    pyfuse3.init(operations, args.mountpoint,
                 {"fsname=nullfs", "subtype=nullfs", "default_permissions", "nodev", "nosuid",
                  "noatime"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
        operations.stop_applying()
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
