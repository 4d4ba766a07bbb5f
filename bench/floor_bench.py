"""The floor of pyfuse3 itself: a minimal read-only filesystem serving everything from memory
(no manifest, no blobs, no checks), measured the way scripts/bench --read measures cafs.

Usage: scripts/bench --read-floor [--files N] [--small N] [--repeat N] [--workdir DIR]

It mounts `corpus/` (N files of 10 KB-1 MB, the same sizes as the read bench's corpus) and
`small/` (a directory of --small entries) with what cafs returns (keep_cache, 300 s entry and
attribute timeouts, READDIRPLUS with attributes, a FLUSH handler, since cafs needs FLUSH to
publish), writes the same files into a plain directory, and prints the same ratios. What this
filesystem cannot beat, no pyfuse3 filesystem can: it bounds what cafs can reach.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyfuse3
import trio

TIMEOUT = 300.0
ROOT = pyfuse3.ROOT_INODE


class MemoryFs(pyfuse3.Operations):
    def __init__(self, sizes: list[int], small: int) -> None:
        super().__init__()
        self.pattern = bytes(random.Random(1).randbytes(1 << 20))
        self.dirs: dict[int, list[int]] = {ROOT: [2, 3], 2: [], 3: []}
        self.names: dict[int, bytes] = {2: b"corpus", 3: b"small"}
        self.sizes: dict[int, int] = {}
        self.parent: dict[int, int] = {2: ROOT, 3: ROOT}
        ino = 10
        for i, size in enumerate(sizes):
            self._add(2, ino, f"file{i:04d}".encode(), size)
            ino += 1
        for i in range(small):
            self._add(3, ino, f"f{i:06d}".encode(), 10)
            ino += 1
        self.by_name = {(self.parent[i], n): i for i, n in self.names.items()}
        self.now = time.time_ns()

    def _add(self, parent: int, ino: int, name: bytes, size: int) -> None:
        self.dirs[parent].append(ino)
        self.names[ino] = name
        self.sizes[ino] = size
        self.parent[ino] = parent

    def attr(self, ino: int) -> pyfuse3.EntryAttributes:
        out = pyfuse3.EntryAttributes()
        out.st_ino = ino
        out.entry_timeout = out.attr_timeout = TIMEOUT
        is_dir = ino in self.dirs
        out.st_mode = (stat.S_IFDIR | 0o755) if is_dir else (stat.S_IFREG | 0o644)
        out.st_nlink = 2 if is_dir else 1
        out.st_size = 0 if is_dir else self.sizes[ino]
        out.st_blksize = 128 * 1024
        out.st_blocks = (out.st_size + 511) // 512
        out.st_atime_ns = out.st_mtime_ns = out.st_ctime_ns = self.now
        return out

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        ino = self.by_name.get((parent_inode, name))
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attr(ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        return self.attr(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        children = self.dirs[fh]
        for position in range(start_id, len(children)):
            ino = children[position]
            if not pyfuse3.readdir_reply(token, self.names[ino], self.attr(ino), position + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        end = min(off + size, self.sizes[fh])
        return self.pattern[off:end] if off < end else b""

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        return None


def serve(mountpoint: Path, fs: MemoryFs) -> None:
    pyfuse3.init(fs, str(mountpoint), {"fsname=floor", "default_permissions", "noatime"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def plain_copy(root: Path, fs: MemoryFs) -> None:
    for directory, children in ((root / "corpus", fs.dirs[2]), (root / "small", fs.dirs[3])):
        directory.mkdir(parents=True)
        for ino in children:
            (directory / fs.names[ino].decode()).write_bytes(fs.pattern[:fs.sizes[ino]])


def sh(command: str) -> None:
    subprocess.run(command, shell=True, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=600)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cafs-bench"))
    args = parser.parse_args()
    rng = random.Random(14)
    sizes = [rng.randrange(10_000, 1_000_000) for _ in range(args.files)]
    work = args.workdir / f"floor-{os.getpid()}"
    mnt, plain = work / "mnt", work / "plain"
    mnt.mkdir(parents=True)
    fs = MemoryFs(sizes, args.small)
    plain_copy(plain, fs)
    server = threading.Thread(target=serve, args=(mnt, fs), daemon=True)
    server.start()
    while not os.path.ismount(mnt):
        time.sleep(0.05)
    figures = {
        "warm re-read of the corpus (cat)":
            "find {r}/corpus -type f -print0 | xargs -0 cat > /dev/null",
        "find -printf walk (size, mtime)": "find {r} -printf '%s %T@ %p\\n'",
        f"ls -l of a {args.small:,}-entry layer, warm": "ls -l {r}/small",
    }
    try:
        for command in figures.values():  # warm both
            sh(command.format(r=mnt))
            sh(command.format(r=plain))
        print(f"  {'figure':<44} {'plain':>10} {'memory fs':>10} {'ratio':>7}")
        for figure, command in figures.items():
            best = {"plain": float("inf"), "fuse": float("inf")}
            for _ in range(args.repeat):
                for side, root in (("plain", plain), ("fuse", mnt)):
                    start = time.perf_counter()
                    sh(command.format(r=root))
                    best[side] = min(best[side], time.perf_counter() - start)
            print(f"  {figure:<44} {best['plain']:>10.3f} {best['fuse']:>10.3f} "
                  f"{best['fuse'] / best['plain']:>6.2f}x", flush=True)
        print(f"load average: {os.getloadavg()[0]:.1f}")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
