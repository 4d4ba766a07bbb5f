"""The write-path figures of scripts/bench: ingest, small-file creates, one big sequential write.

Each figure runs the same work on a plain directory and on the cafs mount, interleaved
(plain, cafs, plain, cafs, ...) and repeated; the best of the repeats counts, so a burst of
load from elsewhere on the machine hurts one sample, not the figure. Targets are ratios to the
plain directory measured in the same run.

- ingest: `cp -r` of a corpus shaped like pipeline output (~600 files of 10 KB-1 MB: CSV,
  JSON, binary; ~300 MB), generated deterministically;
- creates: 4 KiB files with distinct contents, one writer, then four writer processes at once;
- dd: one incompressible file written with `dd bs=1M`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

MB = 1_000_000
MIB = 1 << 20

# One writer process creating `count` 4 KiB files in a directory; prints nothing. Run as its
# own process so that four of them write in parallel for real (no GIL shared between them).
_CREATE_WORKER = """
import os, sys
directory, count, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
os.makedirs(directory, exist_ok=True)
payload = os.urandom(4096 - 40)
for i in range(count):
    with open(os.path.join(directory, f"f{i:06d}"), "wb") as f:
        f.write(payload + tag.ljust(32, b"-")[:32] + i.to_bytes(8, "little"))
"""


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process (all its threads) has spent so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_pipeline_corpus(root: Path, files: int = 600, seed: int = 13) -> tuple[int, int]:
    """~`files` files of 10 KB-1 MB (uniform: ~300 MB for 600), a third each CSV, JSON and
    random binary, under executions/layers/sub-directories; the same bytes on every run."""
    rng = random.Random(seed)
    # Text is cut from pools generated once: generating 200 MB of rows in Python would take
    # minutes. Each file starts with its own header line, so no two files share a hash.
    csv_pool = "".join(f"{i},{rng.randrange(10**6)},{rng.random():.5f},"
                       f"{rng.choice(['cat', 'dog', 'bird', 'fish', 'cow'])}\n"
                       for i in range(80_000)).encode()
    json_pool = "".join(json.dumps({"id": i, "score": round(rng.random(), 5),
                                    "tags": rng.sample(range(100), 3)}) + ",\n"
                        for i in range(50_000)).encode()
    total = 0
    for n in range(files):
        size = rng.randrange(10_000, 1_000_001)
        kind = n % 3
        directory = root / f"exec{n % 4}" / f"step{n % 7}" / f"part{n % 5}"
        directory.mkdir(parents=True, exist_ok=True)
        if kind == 2:
            path, data = directory / f"blob{n:04d}.bin", rng.randbytes(size)
        else:
            pool = csv_pool if kind == 0 else json_pool
            header = f"file {n} seed {seed}\n".encode()
            start = rng.randrange(0, len(pool) - size) if size < len(pool) else 0
            data = (header + pool[start:start + size])[:size]
            path = directory / (f"table{n:04d}.csv" if kind == 0 else f"records{n:04d}.json")
        path.write_bytes(data)
        total += len(data)
    return files, total


def best_of(repeats: int, targets: dict[str, Path],
            work: Callable[[str, Path, int], float]) -> dict[str, float]:
    """The shortest of `repeats` timings of `work(name, target, round)` per target, the
    targets interleaved within each round, each round starting one target further on (what
    one target leaves behind, such as writeback, is not always met by the same other)."""
    best: dict[str, float] = {}
    names = list(targets)
    for round_no in range(repeats):
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            target = targets[name]
            seconds = work(name, target, round_no)
            best[name] = min(best.get(name, seconds), seconds)
    return best


def _timed_run(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - start


def ingest_seconds(corpus: Path, targets: dict[str, Path], repeats: int) -> dict[str, float]:
    sources = sorted(str(p) for p in corpus.iterdir())

    def work(name: str, target: Path, round_no: int) -> float:
        run_dir = target / f"ingest{round_no}"
        run_dir.mkdir()
        layer = run_dir / "layer"
        layer.mkdir()
        return _timed_run("cp", "-r", *sources, str(layer))
    return best_of(repeats, targets, work)


def create_rate(targets: dict[str, Path], count: int, writers: int,
                repeats: int) -> dict[str, float]:
    """Files per second of `writers` processes each creating `count` 4 KiB files at once."""

    def work(name: str, target: Path, round_no: int) -> float:
        run_dir = target / f"creates{writers}x{round_no}"
        run_dir.mkdir()
        dirs = [run_dir / f"w{w}" for w in range(writers)]
        for directory in dirs:
            directory.mkdir()
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", _CREATE_WORKER, str(directory),
                                   str(count), f"{name}{round_no}w{w}"])
                 for w, directory in enumerate(dirs)]
        for proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"a create worker failed in {run_dir}")
        return time.perf_counter() - start
    seconds = best_of(repeats, targets, work)
    return {name: writers * count / value for name, value in seconds.items()}


def dd_rate(source: Path, targets: dict[str, Path], repeats: int) -> dict[str, float]:
    """MB/s of `dd bs=1M` copying an incompressible file (page-cached) into each target."""
    size = source.stat().st_size

    def work(name: str, target: Path, round_no: int) -> float:
        run_dir = target / f"dd{round_no}"
        run_dir.mkdir()
        (run_dir / "layer").mkdir()
        out = run_dir / "layer" / "big.bin"
        seconds = _timed_run("dd", f"if={source}", f"of={out}", "bs=1M", "status=none")
        out.unlink()  # a plain directory would otherwise keep 1 GiB per round in the cache
        return seconds
    seconds = best_of(repeats, targets, work)
    return {name: size / MB / value for name, value in seconds.items()}


def make_incompressible(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = min(left, 16 * MIB)
            f.write(os.urandom(chunk))
            left -= chunk
    with open(path, "rb") as f:  # into the page cache: dd measures the target, not the source
        while f.read(16 * MIB):
            pass


class NullMount:
    """bench/null_fs.py mounted at `mountpoint` while inside the `with`: the floor."""

    def __init__(self, mountpoint: Path, keep_bytes: bool = False,
                 writeback: bool = False, journal: bool = False, apply: bool = False,
                 hash_only: bool = False, hash_thread: bool = False) -> None:
        self.mountpoint = mountpoint
        self.hash_only = hash_only
        self.hash_thread = hash_thread
        self.apply = apply
        self.keep_bytes = keep_bytes
        self.journal = journal
        self.writeback = writeback
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Path:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        script = Path(__file__).with_name("null_fs.py")
        extra = ["--keep-bytes"] if self.keep_bytes else []
        extra += ["--writeback"] if self.writeback else []
        extra += ["--journal"] if self.journal else []
        extra += ["--apply"] if self.apply else []
        extra += ["--hash"] if self.hash_only else []
        extra += ["--hash-thread"] if self.hash_thread else []
        self._proc = subprocess.Popen([sys.executable, str(script), str(self.mountpoint),
                                       *extra])
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mountpoint):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the null filesystem did not mount")
            time.sleep(0.05)
        (self.mountpoint / "runs").mkdir()
        return self.mountpoint / "runs"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not mounted"
        return self._proc.pid

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False)
        if self._proc is not None:
            self._proc.wait(timeout=30)
