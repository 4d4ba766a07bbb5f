"""Read-side benchmark (scripts/bench --read): reads and metadata of a cafs mount against a
plain directory on the same disk, interleaved in one run, best of N.

Usage: scripts/bench --read [--only FIGURES] [--files N] [--big-mib N] [--repeat N]
                            [--workdir DIR] [--json FILE]
--only takes a comma-separated subset of: warm, cold, find, ls, big, bigwarm, random (default:
all); only the data those figures read is made.

The corpus is shaped like pipeline output: ~600 files of 10 KB-1 MB (CSV shards, JSON,
random weights; ~300 MB), a layer of 10,000 small files, one large random artifact (1 GiB:
stored raw+xxh64) and one large text artifact (stored zstd). Generated deterministically, copied
into a plain directory and into the mount with cp. Figures (ratios to the plain directory; the
targets of issue 14): warm re-read and cold read of the corpus (cat of everything), a
find -printf walk (size, mtime), ls -l of the 10,000-entry layer, the large artifact read
sequentially cold and warm, random 4 KiB reads in the zstd artifact, cold.

Each figure is also measured on the floor (bench/floor_fs.py): a pyfuse3 passthrough of the plain
directory with cafs's mount and reply options that does nothing else, interleaved in the same
runs. cafs/floor is what cafs itself costs; floor/plain is what FUSE and pyfuse3 cost.

"Cold" drops the page cache (echo 3 > drop_caches, which needs root) and, for cafs, remounts
first so the daemon's own caches are empty too. The load average is printed with the table:
on a shared machine, read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cafs_bench import MB, Mounted, csv_text, daemon_pid, drop_caches

from cafs.blobstore.zstd_seekable import DEFAULT_FRAME_SIZE

MIB = 1 << 20
FRAME = DEFAULT_FRAME_SIZE  # the stretch of a zstd artifact a random read decompresses
FIGURES = ("warm", "cold", "find", "ls", "big", "bigwarm", "random")


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_corpus(root: Path, files: int, seed: int = 14) -> int:
    """~`files` files of 10 KB-1 MB in executions/layers; returns their bytes."""
    rng = random.Random(seed)
    text = csv_text(rng, 2 * MIB)  # shards are slices of varied text: compressible, distinct
    total = 0
    for i in range(files):
        layer = root / f"exec{i % 6:02d}" / ("prepare", "train", "evaluate")[i % 3]
        if i % 60 == 0:
            layer = layer / f"part{i // 60:02d}"
        layer.mkdir(parents=True, exist_ok=True)
        size = rng.randrange(10_000, 1_000_000)  # 10 KB .. 1 MB, ~300 MB for 600 files
        kind = i % 5
        if kind in (0, 1):
            start = rng.randrange(len(text) - size) if size < len(text) else 0
            data = f"# shard {i}\n".encode() + text[start:start + size]
            name = f"shard{i:04d}.csv"
        elif kind == 2:
            data = json.dumps({"shard": i, "metrics": [rng.random() for _ in range(size // 24)]}
                              ).encode()
            name = f"metrics{i:04d}.json"
        else:
            data = rng.randbytes(size)
            name = f"weights{i:04d}.bin"
        (layer / name).write_bytes(data)
        total += len(data)
    return total


def make_small_layer(layer: Path, count: int) -> None:
    layer.mkdir(parents=True)
    for i in range(count):
        (layer / f"f{i:06d}").write_bytes(f"small {i}\n".encode())


def write_random(path: Path, size: int, seed: int = 5) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        for _ in range(size // MIB):
            out.write(rng.randbytes(MIB))


def write_text(path: Path, size: int, seed: int = 6) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = csv_text(rng, 4 * MIB)
    with open(path, "wb") as out:
        written = 0
        while written < size:
            piece = f"# block {written}\n".encode() + chunk
            out.write(piece[: size - written])
            written += len(piece)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cat_all(root: Path) -> None:
    subprocess.run(f"find {root} -type f -print0 | xargs -0 cat > /dev/null", shell=True,
                   check=True)


def find_walk(root: Path) -> None:
    sh("find", str(root), "-printf", "%s %T@ %p\n")


def ls_l(layer: Path) -> None:
    sh("ls", "-l", str(layer))


def seq_read(path: Path) -> None:
    sh("dd", f"if={path}", "of=/dev/null", "bs=1M")


def random_reads(path: Path, count: int, seed: int = 1) -> None:
    size = path.stat().st_size
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(count):
            os.pread(fd, 4096, rng.randrange(0, max(1, size - 4096)) & ~4095)
    finally:
        os.close(fd)


def random_reads_apart(path: Path, count: int, seed: int = 2) -> None:
    """Random 4 KiB reads, each in a 64 KiB stretch (a cafs frame) no other read touches: what
    a read costs with nothing to reuse (in random_reads about 2 in 5 reads fall in a frame an
    earlier read decompressed, which the page cache then holds whole)."""
    size = path.stat().st_size
    rng = random.Random(seed)
    stretches = rng.sample(range(size // FRAME), min(count, size // FRAME))
    fd = os.open(path, os.O_RDONLY)
    try:
        for stretch in stretches:
            os.pread(fd, 4096, stretch * FRAME + rng.randrange(FRAME // 4096) * 4096)
    finally:
        os.close(fd)


class Floor:
    """bench/floor_fs.py serving `source` at `mountpoint`, in its own process."""

    def __init__(self, source: Path, mountpoint: Path) -> None:
        self.source, self.mountpoint = source, mountpoint
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Floor:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("floor_fs.py")), str(self.source),
             str(self.mountpoint)])
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the floor filesystem did not mount")
            time.sleep(0.02)
        os.stat(self.mountpoint)  # served: read-ahead is set right after this answer
        time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=True)
            self.process.wait()
            self.process = None


class Bench:
    def __init__(self, work: Path, repeat: int, floor: bool) -> None:
        self.work = work
        self.repeat = repeat
        self.plain = work / "plain"
        self.mount = Mounted(work / "store", work / "mnt")
        self.floor = Floor(self.plain, work / "floor") if floor else None
        self.rows: list[dict[str, object]] = []
        self.loads: list[float] = []

    def remount(self) -> None:
        self.mount.__exit__()
        self.mount.__enter__()

    def roots(self) -> list[Path]:
        return [self.plain, self.mount.mountpoint] + (
            [self.floor.mountpoint] if self.floor is not None else [])

    def remount_floor(self) -> None:
        assert self.floor is not None
        self.floor.__exit__()
        self.floor.__enter__()

    def measure(self, figure: str, work: Callable[[Path], object], *, cold: bool,
                target: str, limit: float | None, unit: str = "s",
                per: float | None = None) -> None:
        """Best of `repeat` runs of work() on each side, interleaved (plain, floor, cafs, ...).
        `limit`: the target as a ratio cafs/plain (time) or, with `per`, a rate floor."""
        roots = {"plain": self.plain, "cafs": self.mount.mountpoint}
        if self.floor is not None:
            roots = {"plain": self.plain, "floor": self.floor.mountpoint,
                     "cafs": self.mount.mountpoint}
        best = dict.fromkeys(roots, float("inf"))
        cpu = dict.fromkeys(roots, float("inf"))  # the daemon's CPU seconds in its best run
        for _ in range(self.repeat):
            for side, root in roots.items():
                if cold:
                    if side == "cafs":
                        self.remount()
                    elif side == "floor":
                        self.remount_floor()
                    drop_caches()
                pid = self.server_pid(side)
                cpu_before = cpu_seconds(pid) if pid else 0.0
                start = time.perf_counter()
                work(root)
                elapsed = time.perf_counter() - start
                if elapsed < best[side]:
                    best[side] = elapsed
                    cpu[side] = cpu_seconds(pid) - cpu_before if pid else float("nan")
            self.loads.append(os.getloadavg()[0])
        ratio = best["cafs"] / best["plain"]
        floor_ratio = best["floor"] / best["plain"] if "floor" in best else None
        if per is not None:  # a rate: higher is better
            shown_of = {side: per / seconds for side, seconds in best.items()}
            met = None if limit is None else shown_of["cafs"] >= limit
            fmt = "{:>11,.0f}"
        else:
            shown_of = dict(best)
            met = None if limit is None else ratio <= limit
            fmt = "{:>11.3f}"
        shown = " ".join(fmt.format(shown_of.get(side, float("nan")))
                         for side in ("plain", "floor", "cafs"))
        floors = ("" if floor_ratio is None else
                  f"{floor_ratio:>6.2f}x {best['cafs'] / best['floor']:>6.2f}x")
        verdict = "" if met is None else ("met" if met else "MISSED")
        cpu_ms = ("" if per is None else "  daemon CPU/op: " + ", ".join(
            f"{side} {cpu[side] * 1e6 / per:.0f} us" for side in ("floor", "cafs") if side in cpu))
        if per is None:
            cpu_ms = "  daemon CPU: " + ", ".join(
                f"{side} {cpu[side] * 1e3:.0f} ms" for side in ("floor", "cafs") if side in cpu)
        print(f"  {figure:<44} {shown} {unit:<8} {ratio:>6.2f}x {floors:>15}  {target} {verdict}"
              f"{cpu_ms}", flush=True)
        self.rows.append({"figure": figure, "unit": unit, **shown_of, "time_ratio": ratio,
                          "floor_ratio": floor_ratio, "cafs_over_floor":
                          None if floor_ratio is None else best["cafs"] / best["floor"],
                          "target": target, "met": met,
                          "daemon_cpu_s": {side: cpu[side] for side in cpu if side != "plain"},
                          "load": os.getloadavg()[0]})

    def server_pid(self, side: str) -> int | None:
        """The process that serves `side` (its CPU is what the figure costs it), if any."""
        if side == "cafs":
            return daemon_pid(self.mount.store)
        if side == "floor" and self.floor is not None and self.floor.process is not None:
            return self.floor.process.pid
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=600, help="files of the corpus")
    parser.add_argument("--small", type=int, default=10_000, help="entries of the ls -l layer")
    parser.add_argument("--big-mib", type=int, default=1024, help="the large artifact, MiB")
    parser.add_argument("--zstd-mib", type=int, default=256, help="the zstd artifact, MiB")
    parser.add_argument("--random-reads", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3, help="best of N")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cafs-bench"))
    parser.add_argument("--json", type=Path, default=Path("bench-results/read.json"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor filesystem")
    parser.add_argument("--only", default=",".join(FIGURES),
                        help=f"comma-separated figures to run, of {', '.join(FIGURES)}")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(FIGURES):
        parser.error(f"--only: unknown figures {', '.join(sorted(only - set(FIGURES)))}")
    if os.geteuid() != 0:
        print("note: not root: the page cache cannot be dropped; 'cold' figures are warm")

    work = args.workdir / f"read-{os.getpid()}"
    source = work / "source"
    total = make_corpus(source / "corpus", args.files if only & {"warm", "cold", "find"} else 1)
    make_small_layer(source / "small" / "layer", args.small if only & {"find", "ls"} else 1)
    write_random(source / "big" / "l" / "big.bin",
                 args.big_mib * MIB if only & {"big", "bigwarm"} else MIB)
    write_text(source / "zstd" / "l" / "big.csv",
               args.zstd_mib * MIB if "random" in only else MIB)
    print(f"corpus: {args.files} files, {total / MB:.0f} MB; a {args.small:,}-entry layer; "
          f"{args.big_mib} MiB raw and {args.zstd_mib} MiB text artifacts, in {work}")
    bench = Bench(work, args.repeat, floor=not args.no_floor)
    bench.plain.mkdir()
    bench.mount.__enter__()
    try:
        for root in (bench.plain / "runs", bench.mount.mountpoint / "runs"):
            root.mkdir(exist_ok=True)
            sh("cp", "-r", *sorted(str(p) for p in source.iterdir()), str(root))
        shutil.rmtree(source)
        if bench.floor is not None:
            bench.floor.__enter__()
        big = bench.mount.mountpoint / "runs/big/l/big.bin"
        zst = bench.mount.mountpoint / "runs/zstd/l/big.csv"
        print(f"encodings: big {os.getxattr(big, 'user.cafs.encoding').decode()}, "
              f"text {os.getxattr(zst, 'user.cafs.encoding').decode()}; "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"  {'figure':<44} {'plain':>11} {'floor':>11} {'cafs':>11} {'unit':<8} "
              f"{'c/plain':>7} {'f/plain':>7} {'c/floor':>7}  target")
        corpus = Path("runs/corpus")
        if "warm" in only:
            for root in bench.roots():  # warm all
                cat_all(root / corpus)
            bench.measure("warm re-read of the corpus (cat)", lambda r: cat_all(r / corpus),
                          cold=False, target="<= 1.5x", limit=1.5)
        if "cold" in only:
            bench.measure("cold read of the corpus (cat)", lambda r: cat_all(r / corpus),
                          cold=True, target="<= 1.7x", limit=1.7)
        if "find" in only:
            for root in bench.roots():
                find_walk(root / "runs")
            bench.measure("find -printf walk (size, mtime)", lambda r: find_walk(r / "runs"),
                          cold=False, target="<= 2.5x", limit=2.5)
        layer = Path("runs/small/layer")
        if "ls" in only:
            bench.measure(f"ls -l of a {args.small:,}-entry layer, cold",
                          lambda r: ls_l(r / layer), cold=True, target="<= 1.5x", limit=1.5)
            bench.measure(f"ls -l of a {args.small:,}-entry layer, warm",
                          lambda r: ls_l(r / layer), cold=False, target="<= 1.5x", limit=1.5)
        big_rel = Path("runs/big/l/big.bin")
        if "big" in only:
            bench.measure(f"{args.big_mib} MiB artifact, sequential, cold",
                          lambda r: seq_read(r / big_rel), cold=True,
                          target=">= 70% (<= 1.43x)", limit=1 / 0.7)
        if "bigwarm" in only:
            for root in bench.roots():
                seq_read(root / big_rel)
            bench.measure(f"{args.big_mib} MiB artifact, sequential, warm",
                          lambda r: seq_read(r / big_rel), cold=False,
                          target=">= 90% (<= 1.11x)", limit=1 / 0.9)
        if "random" in only:
            bench.measure(f"random 4 KiB reads, {args.zstd_mib} MiB zstd artifact, cold",
                          lambda r: random_reads(r / "runs/zstd/l/big.csv", args.random_reads),
                          cold=True, target=">= 5,000/s", limit=5000, unit="reads/s",
                          per=args.random_reads)
            apart = min(args.random_reads, args.zstd_mib * MIB // FRAME)
            bench.measure("the same, each read in a 64 KiB stretch of its own",
                          lambda r: random_reads_apart(r / "runs/zstd/l/big.csv", apart),
                          cold=True, target="(no reuse)", limit=None, unit="reads/s",
                          per=apart)
    finally:
        if bench.floor is not None:
            bench.floor.__exit__()
        bench.mount.__exit__()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    loads = bench.loads
    print(f"load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": bench.rows, "load": [min(loads), max(loads)]},
                                    indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
