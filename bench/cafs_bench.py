"""cafs benchmark: the same work on a cafs mount and on a plain directory on the same disk.

Usage: scripts/bench [--scale X] [--workdir DIR] [--json FILE] [--scale-artifacts N]
                     [--fair-run-artifacts N] [--fair-truncate-gib N] [--fair-tag-layers N]
                     [--write-files N] [--creates N] [--dd-mib N] [--repeat N] [--only-writes]
                     [--floor] [--ingest-levels L,L,...]

--scale 0 skips the corpus figures (e.g. to run only the fairness figures).

Prints one table (figure, plain, cafs, ratio, target) and writes the same as JSON. Timings are
noisy (±30% on a 2-core VM): read the ratios. Needs root to drop the page cache for the cold
read; without root, the "cold" figures are warm and marked so.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import write_figures

from cafs.blobstore import Blobs
from cafs.digest import digest_of_bytes
from cafs.manifest_api import BulkArtifact
from cafs.store import Store, serving_daemon

CAFS = [sys.executable, "-m", "cafs"]
MB = 1_000_000


@dataclass
class Row:
    figure: str
    unit: str
    plain: float | None
    cafs: float
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.plain in (None, 0):
            return None
        return self.cafs / self.plain  # type: ignore[operator]


@dataclass
class Report:
    scale: float
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        plain = "-" if row.plain is None else f"{row.plain:,.2f}"
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        verdict = "" if row.met is None else ("met" if row.met else "MISSED")
        print(f"  {row.figure:<44} {plain:>12} {row.cafs:>12,.2f} {row.unit:<8} {ratio:>7}  "
              f"{row.target} {verdict}", flush=True)


def run(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, cwd=cwd).stdout


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_each(targets: dict[str, Path], work: Callable[[Path], object], *,
              cold: bool = False) -> dict[str, float]:
    """Seconds `work(target)` takes on each target (plain, cafs); `cold` drops the page cache
    before each one."""
    times = {}
    for name, target in targets.items():
        if cold:
            drop_caches()
        times[name] = timed(functools.partial(work, target))
    return times


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# -- the corpus -----------------------------------------------------------------------------

def csv_text(rng: random.Random, size: int) -> bytes:
    rows = []
    total = 0
    i = 0
    while total < size:
        row = f"{i},{rng.randrange(10**6)},{rng.random():.5f},{rng.choice(LABELS)}\n"
        rows.append(row)
        total += len(row)
        i += 1
    return "".join(rows).encode()[:size]


LABELS = ["cat", "dog", "bird", "fish", "horse", "sheep", "cow", "mouse"]


def make_corpus(root: Path, scale: float, seed: int = 7) -> tuple[int, int]:
    """Executions with prepare/train/evaluate layers; returns (files, bytes)."""
    rng = random.Random(seed)
    executions = max(2, round(4 * scale ** 0.5))
    dataset = csv_text(rng, max(64 * 1024, int(24 * MB * scale)))  # the same in every execution
    files = total = 0
    for e in range(executions):
        base = root / f"exec{e:03d}"
        layers = {name: base / name for name in ("prepare", "train", "evaluate")}
        for path in layers.values():
            path.mkdir(parents=True)
        outputs = {
            layers["prepare"] / "dataset.csv": dataset,
            layers["prepare"] / "schema.json": json.dumps(
                {"columns": ["id", "value", "score", "label"], "exec": e}, indent=2).encode(),
            layers["train"] / "weights.bin": rng.randbytes(max(4096, int(16 * MB * scale))),
            layers["train"] / "train.log": b"".join(
                f"step {s} loss {1 / (s + 1):.6f} lr 0.001\n".encode()
                for s in range(max(100, int(60_000 * scale)))),
            layers["evaluate"] / "predictions.csv": csv_text(rng, max(8192, int(4 * MB * scale))),
            layers["evaluate"] / "metrics.json": json.dumps(
                {"accuracy": rng.random(), "loss": rng.random()}).encode(),
        }
        for c in range(max(2, int(20 * scale))):
            outputs[layers["train"] / "checkpoints" / f"ckpt{c:03d}.bin"] = rng.randbytes(
                max(1024, int(256 * 1024 * scale)))
        for path, data in outputs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files += 1
            total += len(data)
    return files, total


# -- measurements ---------------------------------------------------------------------------

def read_tree(root: Path) -> int:
    total = 0
    for directory, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(directory, name), "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
    return total


def stat_walk(root: Path) -> int:
    count = 0
    for directory, dirs, names in os.walk(root):
        for name in names + dirs:
            os.stat(os.path.join(directory, name))
            count += 1
    return count


def create_small_files(directory: Path, count: int) -> None:
    directory.mkdir(parents=True)
    payload = os.urandom(4096)
    for i in range(count):
        with open(directory / f"f{i:06d}", "wb") as f:
            f.write(payload[: 4096 - 8] + i.to_bytes(8, "little"))  # distinct contents


def random_reads(path: Path, count: int, seed: int = 1) -> None:
    size = path.stat().st_size
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(count):
            os.pread(fd, 4096, rng.randrange(0, max(1, size - 4096)))
    finally:
        os.close(fd)


class Mounted:
    def __init__(self, store: Path, mountpoint: Path, *options: str) -> None:
        self.store, self.mountpoint = store, mountpoint
        self.options = options  # more `cafs mount` options, e.g. -o compression=N

    def __enter__(self) -> Mounted:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        subprocess.run([*CAFS, "mount", "--store", str(self.store), *self.options,
                        str(self.mountpoint)], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run([*CAFS, "umount", str(self.mountpoint)], check=True)

    def stats(self) -> dict[str, int]:
        out = run(*CAFS, "stats", "--json", "--store", str(self.store))
        return json.loads(out)

    def daemon_rss_mb(self) -> float:
        pid = daemon_pid(self.store)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


def throughput_rows(report: Report, work: Path, corpus: Path, scale: float) -> None:
    sizes = [p.stat().st_size for p in corpus.rglob("*") if p.is_file()]
    files, total = len(sizes), sum(sizes)
    plain = work / "plain"
    (plain / "runs").mkdir(parents=True)
    with Mounted(work / "store", work / "mnt") as mount:
        targets = {"plain": plain / "runs", "cafs": mount.mountpoint / "runs"}
        sources = sorted(str(p) for p in corpus.iterdir())
        ingest = time_each(targets, lambda target: run("cp", "-r", *sources, str(target)))
        report.add(Row("ingest: cp -r corpus (MB/s)", "MB/s", total / MB / ingest["plain"],
                       total / MB / ingest["cafs"]))
        report.add(Row("ingest: time", "s", ingest["plain"], ingest["cafs"], "<= 2.5x",
                       ingest["cafs"] <= 2.5 * ingest["plain"]))
        report.add(Row("ingest: files/s", "files/s", files / ingest["plain"],
                       files / ingest["cafs"]))

        cold_ok = drop_caches()
        cold = time_each(targets, read_tree)
        if not cold_ok:
            report.notes.append("not root: the page cache was not dropped; 'cold' is warm")
        report.add(Row("cold sequential read of everything", "s", cold["plain"], cold["cafs"],
                       "<= 2x", cold["cafs"] <= 2 * cold["plain"]))
        warm = time_each(targets, read_tree)
        report.add(Row("warm re-read of everything", "s", warm["plain"], warm["cafs"], "<= 1.5x",
                       warm["cafs"] <= 1.5 * warm["plain"]))
        report.add(Row("warm re-read (MB/s)", "MB/s", total / MB / warm["plain"],
                       total / MB / warm["cafs"]))

        count = max(500, int(5000 * min(scale, 1)))
        dataset = "exec000/prepare/dataset.csv"
        # cold: the daemon (or the disk) serves them, not the page cache
        rr = time_each(targets, lambda target: random_reads(target / dataset, count), cold=True)
        encoding = os.getxattr(targets["cafs"] / dataset, "user.cafs.encoding").decode()
        report.add(Row(f"random 4 KiB reads in a {encoding} artifact", "reads/s",
                       count / rr["plain"], count / rr["cafs"], ">= 2,000/s",
                       count / rr["cafs"] >= 2000))

        walk = time_each(targets, stat_walk)
        report.add(Row("find/stat walk of everything", "s", walk["plain"], walk["cafs"],
                       "<= 3x", walk["cafs"] <= 3 * walk["plain"]))

        small = max(200, int(10_000 * min(scale, 1))) if scale < 1 else 10_000
        for target in targets.values():
            (target / "smallfiles").mkdir()
        created = time_each(
            targets, lambda target: create_small_files(target / "smallfiles" / "layer", small))
        report.add(Row(f"create {small:,} files of 4 KiB", "files/s", small / created["plain"],
                       small / created["cafs"], ">= 2,000/s", small / created["cafs"] >= 2000))
        drop_caches()
        ls = time_each(targets, lambda target: run("ls", "-l", str(target / "smallfiles/layer")))
        report.add(Row(f"ls -l of a {small:,}-entry layer", "s", ls["plain"], ls["cafs"]))

        stats = mount.stats()
        du_plain = int(run("du", "-sb", str(plain)).split()[0])
        report.add(Row("space: stored / logical bytes", "ratio", None,
                       stats["stored_bytes"] / max(1, stats["logical_bytes"]), "<= 0.76",
                       stats["stored_bytes"] / max(1, stats["logical_bytes"]) <= 0.76))
        report.notes.append(f"logical {stats['logical_bytes']:,} B, stored "
                            f"{stats['stored_bytes']:,} B, plain du {du_plain:,} B, "
                            f"{stats['artifacts']:,} artifacts in {stats['blobs']:,} blobs")
        report.add(Row("daemon RSS after the run", "MB", None, mount.daemon_rss_mb()))


# -- scale ----------------------------------------------------------------------------------

def generated_content(i: int) -> bytes:
    """The i-th of the 1,000 small contents generate_store shares among its artifacts."""
    return f"artifact content {i}\n".encode()


def generate_store(store_root: Path, artifacts: int, per_layer: int = 10_000) -> None:
    """Fill a store with `artifacts` artifacts (executions of ten layers of per_layer files),
    sharing 1,000 small blobs, through the manifest's bulk load: one transaction per layer,
    every row as publishing each file would leave it (the store passes cafs fsck --full)."""
    store = Store.open(store_root)
    try:
        blobs: Blobs = store.blobs
        stored = []
        for i in range(1000):
            temp = blobs.new_temp()
            temp.write(0, generated_content(i))
            stored.append(blobs.publish(temp, temp.digest()))
            temp.discard()
        now = time.time_ns()
        made = 0
        for layer_no in range((artifacts + per_layer - 1) // per_layer):
            count = min(per_layer, artifacts - made)
            store.manifest.bulk_load_layer(
                f"exec{layer_no // 10:05d}", f"layer{layer_no % 10}",
                [BulkArtifact(f"a{i:05d}.bin", stored[(made + i) % 1000]) for i in range(count)],
                mode=0o755, uid=0, gid=0, now_ns=now)
            made += count
    finally:
        store.close()


def mount_digest() -> str:
    """The content held by the most artifacts: generate_store gives artifact k the content
    k % 1000, so content 0 is held at least as often as any other."""
    return digest_of_bytes(generated_content(0))


def lookup_seconds(mountpoint: Path, artifacts: int, samples: int, seed: int = 3) -> float:
    """Mean time of a stat of a random artifact the kernel has never looked up.

    A first pass over other random artifacts warms the daemon (SQLite's B-tree interior pages,
    the execution and layer directories), so the figure is the steady-state cost of a lookup
    the kernel cannot answer itself: what "no slower at a million artifacts" is about."""
    rng = random.Random(seed)
    layers = (artifacts + 9999) // 10_000
    paths: set[Path] = set()
    while len(paths) < min(2 * samples, artifacts):
        layer_no = rng.randrange(layers)
        count = min(10_000, artifacts - layer_no * 10_000)
        paths.add(mountpoint / "runs" / f"exec{layer_no // 10:05d}" / f"layer{layer_no % 10}" /
                  f"a{rng.randrange(count):05d}.bin")
    ordered = list(paths)
    rng.shuffle(ordered)
    warm_up, measured = ordered[: len(ordered) // 2], ordered[len(ordered) // 2:]
    for path in warm_up:
        os.stat(path)
    start = time.perf_counter()
    for path in measured:
        os.stat(path)
    return (time.perf_counter() - start) / len(measured)


def scale_rows(report: Report, work: Path, artifacts: int) -> None:
    results = {}
    for label, count in (("small", min(1000, artifacts)), ("large", artifacts)):
        store = work / f"scale-{label}"
        start = time.perf_counter()
        generate_store(store, count)
        if label == "large":
            elapsed = time.perf_counter() - start
            report.notes.append(f"generated {count:,} artifacts in {elapsed:.1f} s")
        mnt = work / f"scale-{label}-mnt"
        mnt.mkdir()
        drop_caches()
        started = time.perf_counter()
        with Mounted(store, mnt) as mount:
            serve_time = time.perf_counter() - started
            samples = min(2000, count // 4)
            per_lookup = lookup_seconds(mnt, count, samples)
            # The server's steady state: the manifest's pages are in the page cache.
            with open(store / "manifest.sqlite", "rb") as manifest:
                while manifest.read(1 << 20):
                    pass
            per_lookup_warm = lookup_seconds(mnt, count, samples, seed=11)
            layer = mnt / "runs" / "exec00000" / "layer0"
            ls_time = timed(functools.partial(run, "ls", "-l", str(layer)))
            rss = mount.daemon_rss_mb()
            if label == "large":
                # Records are computed on demand in SQL: the first read after a change pays.
                execution = mnt / "runs" / "exec00000"
                record_times = {name: timed(functools.partial((path / ".record.json").read_bytes))
                                for name, path in (("layer", layer), ("execution", execution))}
                layer_size = json.loads((layer / ".record.json").read_text())["artifacts"]
                run_size = json.loads((execution / ".record.json").read_text())["artifacts"]
                find_time = timed(functools.partial(
                    run, sys.executable, "-m", "cafs", "find", "--store", str(store),
                    "--sha256", mount_digest()))
        results[label] = (serve_time, per_lookup, ls_time, rss, per_lookup_warm)
    small, large = results["small"], results["large"]
    report.add(Row(f"scale {artifacts:,}: mount serves after", "s", None, large[0], "<= 2 s",
                   large[0] <= 2))
    report.add(Row(f"scale {artifacts:,}: daemon RSS", "MB", None, large[3], "< 200 MB",
                   large[3] < 200))
    entries = min(10_000, artifacts)
    report.add(Row(f"scale {artifacts:,}: ls -l of a {entries:,}-entry layer", "s", None,
                   large[2], "< 0.5 s", large[2] < 0.5))
    report.add(Row(f"scale {artifacts:,}: .record.json of a {layer_size:,}-artifact layer",
                   "s", None, record_times["layer"], "< 0.5 s", record_times["layer"] < 0.5))
    report.add(Row(f"scale {artifacts:,}: .record.json of a {run_size:,}-artifact run", "s",
                   None, record_times["execution"], "< 2 s", record_times["execution"] < 2))
    report.add(Row(f"scale {artifacts:,}: cafs find --sha256 (CLI, mounted)", "s", None,
                   find_time))
    report.add(Row(f"scale: lookup, {min(1000, artifacts):,} vs {artifacts:,}, cold", "us",
                   small[1] * 1e6, large[1] * 1e6))
    report.add(Row(f"scale: lookup, {min(1000, artifacts):,} vs {artifacts:,}, manifest cached",
                   "us", small[4] * 1e6, large[4] * 1e6, "no slower (<= 1.3x, noise)",
                   large[4] <= 1.3 * small[4]))


# -- fairness: what one user's heavy request costs everyone else ---------------------------

class Prober:
    """Another user's `ls` and `cat` of a small layer, timed, in a thread."""

    def __init__(self, layer: Path) -> None:
        self.layer = layer
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            os.listdir(self.layer)
            (self.layer / "small").read_bytes()
            self.latencies.append(time.perf_counter() - start)
            time.sleep(0.01)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def worst(self) -> float:
        return max(self.latencies, default=0.0)


def daemon_pid(store: Path) -> int:
    daemon = serving_daemon(store)
    assert daemon is not None and daemon.pid is not None, f"no daemon serves {store}"
    return daemon.pid


def daemon_cpu_seconds(mount: Mounted) -> float:
    pid = daemon_pid(mount.store)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fairness_rows(report: Report, work: Path, run_artifacts: int, truncate_gib: int,
                  tag_layers: int) -> None:
    """A run's record over many artifacts, truncate -s of a big size, and records of
    tag-heavy layers: the first two timed with another user's ls/cat probing meanwhile."""
    store, mnt = work / "fair-store", work / "fair-mnt"
    if run_artifacts:
        generate_store(store, run_artifacts, per_layer=max(1, run_artifacts // 10))
    with Mounted(store, mnt) as mount:
        small = mnt / "runs" / "probe" / "l"
        small.mkdir(parents=True)
        (small / "small").write_bytes(b"hello\n")
        if run_artifacts:
            run_dir = mnt / "runs" / "exec00000"
            reads = []
            with Prober(small) as prober:
                for n in range(5):
                    (run_dir / "layer0" / f"new{n}").write_bytes(b"x")  # no cached record
                    reads.append(timed((run_dir / ".record.json").read_bytes))
            report.add(Row(f"fair: .record.json of a {run_artifacts:,}-artifact run", "s", None,
                           sorted(reads)[2], "< 0.1 s", sorted(reads)[2] < 0.1))
            report.add(Row("fair: worst ls/cat meanwhile", "s", None, prober.worst, "< 0.5 s",
                           prober.worst < 0.5))
        if truncate_gib:
            big = mnt / "runs" / "probe" / "big"
            big.mkdir()
            cpu = daemon_cpu_seconds(mount)
            with Prober(small) as prober:
                took = timed(functools.partial(
                    run, "truncate", "-s", f"{truncate_gib}G", str(big / "sparse")))
            cpu = daemon_cpu_seconds(mount) - cpu
            report.add(Row(f"fair: truncate -s {truncate_gib}G, wall", "s", None, took))
            report.add(Row(f"fair: truncate -s {truncate_gib}G, daemon CPU", "s", None, cpu))
            report.add(Row("fair: worst ls/cat meanwhile", "s", None, prober.worst, "< 0.5 s",
                           prober.worst < 0.5))
        if tag_layers:
            # As many tags as setxattr allows per layer (16 x 64 KiB), of bytes that JSON
            # escapes 6-fold; every layer's record read once.
            value = bytes(range(32)) * 2048
            run_dir = mnt / "runs" / "tagged"
            for i in range(tag_layers):
                layer = run_dir / f"layer{i:03d}"
                layer.mkdir(parents=True)
                for t in range(15):
                    os.setxattr(layer, f"user.t{t:02d}", value)
            rss = mount.daemon_rss_mb()
            for i in range(tag_layers):
                (run_dir / f"layer{i:03d}" / ".record.json").read_bytes()
            report.add(Row(f"fair: daemon RSS growth, records of {tag_layers} layers with "
                           "1 MB of tags each", "MB", None, mount.daemon_rss_mb() - rss,
                           "< 50 MB", mount.daemon_rss_mb() - rss < 50))


def write_rows(report: Report, work: Path, files: int, creates: int, dd_mib: int,
               repeat: int, floor: bool = False, levels: tuple[int, ...] = ()) -> None:
    """The write path's figures (see write_figures), against the targets of the issue that
    rebuilt it: ingest <= 2.0x, creates >= 2,500/s (one writer) and >= 5,000/s (four), dd >= 70%
    of the plain directory. With `floor`, the same figures on bench/null_fs.py too: a pyfuse3
    filesystem that does nothing per request, so no pyfuse3 filesystem can beat its ratios, and
    on bench/null_fs.py --hash, which only hashes the bytes (SHA-256) as they arrive: no
    content-addressed pyfuse3 filesystem can beat that one. `levels`: the ingest also on cafs
    mounted with each of these levels (-o compression=N; 0: every blob raw), in the same
    rounds."""
    plain = work / "wplain" / "runs"
    plain.mkdir(parents=True)
    report.notes.append(f"load average before the write figures: {write_figures.load_average()}")
    if files:
        corpus = work / "wcorpus"
        count, total = write_figures.make_pipeline_corpus(corpus, files)
        print(f"write corpus: {count} files, {total / MB:.1f} MB")
    if dd_mib:
        source = work / "incompressible.bin"
        write_figures.make_incompressible(source, dd_mib << 20)
    with contextlib.ExitStack() as stack:
        mount = stack.enter_context(Mounted(work / "wstore", work / "wmnt"))
        targets = {"plain": plain, "cafs": mount.mountpoint / "runs"}
        daemons = {"cafs": daemon_pid(mount.store)}
        if floor:  # the kernel's writeback cache off (as cafs) and on: the better one counts
            targets["floor"] = stack.enter_context(write_figures.NullMount(work / "nullmnt"))
            targets["floor-wb"] = stack.enter_context(
                write_figures.NullMount(work / "nullwbmnt", writeback=True))
            # The least a daemon whose close() survives kill -9 must do (null_fs.py --journal).
            targets["journal"] = stack.enter_context(
                write_figures.NullMount(work / "nulljmnt", journal=True))
            # ... and that applies the journal to blob files and SQLite in a thread, in groups.
            targets["applied"] = stack.enter_context(
                write_figures.NullMount(work / "nullamnt", journal=True, apply=True))
            # Only SHA-256 of every byte, as it arrives: the least a content-addressed store does.
            hashing = write_figures.NullMount(work / "nullhmnt", hash_only=True)
            targets["hash"] = stack.enter_context(hashing)
            daemons["hash"] = hashing.pid
            hashing = write_figures.NullMount(work / "nullhtmnt", hash_only=True, hash_thread=True)
            targets["hash-thread"] = stack.enter_context(hashing)
            daemons["hash-thread"] = hashing.pid
        ingest_targets = dict(targets)
        for level in levels:
            mounted = stack.enter_context(Mounted(work / f"wstore{level}", work / f"w{level}mnt",
                                                  "-o", f"compression={level}"))
            ingest_targets[f"cafs-{level}"] = mounted.mountpoint / "runs"
            daemons[f"cafs-{level}"] = daemon_pid(mounted.store)
        if files:
            cpu = {name: write_figures.cpu_seconds(pid) for name, pid in daemons.items()}
            seconds = write_figures.ingest_seconds(corpus, ingest_targets, repeat)
            for name, pid in daemons.items():  # what each daemon's process spent per round
                spent = (write_figures.cpu_seconds(pid) - cpu[name]) / repeat
                report.notes.append(f"ingest: {name} daemon CPU {spent:.2f} s per cp -r "
                                    f"(best wall {seconds[name]:.2f} s)")
            ratio = seconds["cafs"] / seconds["plain"]
            report.add(Row(f"write: cp -r {count} files, {total / MB:.0f} MB", "s",
                           seconds["plain"], seconds["cafs"], "<= 2.0x", ratio <= 2.0))
            if floor:
                report.add(Row("floor: the same cp -r, null pyfuse3 fs", "s", seconds["plain"],
                               seconds["floor"]))
                report.add(Row("floor: the same, writeback cache on", "s", seconds["plain"],
                               seconds["floor-wb"]))
                report.add(Row("floor: the same, bytes hashed and journaled at close", "s",
                               seconds["plain"], seconds["journal"]))
                report.add(Row("floor: journaled, then applied in a thread", "s",
                               seconds["plain"], seconds["applied"]))
                report.add(Row("floor: only SHA-256 of the bytes", "s",
                               seconds["plain"], seconds["hash"]))
                report.add(Row("floor: the same, hashed in a thread", "s",
                               seconds["plain"], seconds["hash-thread"]))
            for level in levels:
                report.add(Row(f"write: the same cp -r, cafs -o compression={level}"
                               + (" (raw)" if level == 0 else ""), "s", seconds["plain"],
                               seconds[f"cafs-{level}"]))
        if creates:
            for writers, target in ((1, 2500), (4, 5000)):
                rate = write_figures.create_rate(targets, creates, writers, repeat)
                report.add(Row(f"write: 4 KiB creates, {writers} writer(s)", "files/s",
                               rate["plain"], rate["cafs"], f">= {target:,}/s",
                               rate["cafs"] >= target))
                if floor:
                    report.add(Row(f"floor: 4 KiB creates, {writers} writer(s)", "files/s",
                                   rate["plain"], rate["floor"]))
                    report.add(Row("floor: the same, writeback cache on", "files/s",
                                   rate["plain"], rate["floor-wb"]))
                    report.add(Row("floor: the same, bytes hashed and journaled at close",
                                   "files/s", rate["plain"], rate["journal"]))
                    report.add(Row("floor: journaled, then applied in a thread", "files/s",
                                   rate["plain"], rate["applied"]))
                    report.add(Row("floor: only SHA-256 of the bytes", "files/s",
                                   rate["plain"], rate["hash"]))
                    report.add(Row("floor: the same, hashed in a thread", "files/s",
                                   rate["plain"], rate["hash-thread"]))
        if dd_mib:
            rate = write_figures.dd_rate(source, targets, repeat)
            report.add(Row(f"write: dd bs=1M of {dd_mib} MiB incompressible", "MB/s",
                           rate["plain"], rate["cafs"], ">= 0.70x",
                           rate["cafs"] >= 0.7 * rate["plain"]))
            if floor:
                report.add(Row("floor: the same dd, null pyfuse3 fs", "MB/s", rate["plain"],
                               rate["floor"]))
                report.add(Row("floor: the same, writeback cache on", "MB/s", rate["plain"],
                               rate["floor-wb"]))
                report.add(Row("floor: only SHA-256 of the bytes", "MB/s",
                               rate["plain"], rate["hash"]))
                report.add(Row("floor: the same, hashed in a thread", "MB/s",
                               rate["plain"], rate["hash-thread"]))
    report.notes.append(f"load average after the write figures: {write_figures.load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="corpus size multiplier (1.0: ~250 MB, 4 executions)")
    parser.add_argument("--scale-artifacts", type=int, default=1_000_000,
                        help="artifacts generated for the scale figures (0: skip)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cafs-bench"),
                        help="where corpus, plain directory and store go (one disk)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/latest.json"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--fair-run-artifacts", type=int, default=None,
                        help="artifacts of the run whose record is read (default: "
                             "--scale-artifacts / 5; 0: skip)")
    parser.add_argument("--fair-truncate-gib", type=int, default=None,
                        help="size of the truncate -s figure, GiB (default: 50 x --scale, "
                             "at least 1, at most 50; 0: skip)")
    parser.add_argument("--fair-tag-layers", type=int, default=None,
                        help="layers with 1 MB of tags whose records are read (default: "
                             "72 x --scale, at least 2, at most 72; 0: skip)")
    parser.add_argument("--write-files", type=int, default=600,
                        help="files of the write corpus (~0.5 MB each; 0: skip the ingest figure)")
    parser.add_argument("--creates", type=int, default=2000,
                        help="4 KiB files each create writer makes (0: skip)")
    parser.add_argument("--dd-mib", type=int, default=1024,
                        help="size of the dd bs=1M figure, MiB (0: skip)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of each write figure; the best counts")
    parser.add_argument("--floor", action="store_true",
                        help="also run the write figures on a null pyfuse3 filesystem")
    parser.add_argument("--ingest-levels", default="",
                        help="comma-separated levels (-o compression=N; 0: raw) of more cafs "
                        "mounts the ingest also runs on, e.g. 1,-1,-5,0")
    parser.add_argument("--only-writes", action="store_true",
                        help="only the write figures (the other sections are skipped)")
    args = parser.parse_args()
    if args.only_writes:
        args.scale = 0
        args.scale_artifacts = args.fair_run_artifacts = 0
        args.fair_truncate_gib = args.fair_tag_layers = 0
    if args.fair_run_artifacts is None:
        args.fair_run_artifacts = args.scale_artifacts // 5
    if args.fair_truncate_gib is None:
        args.fair_truncate_gib = max(1, round(50 * min(args.scale, 1)))
    if args.fair_tag_layers is None:
        args.fair_tag_layers = max(2, round(72 * min(args.scale, 1)))

    work = args.workdir / f"run-{os.getpid()}"
    work.mkdir(parents=True)
    report = Report(scale=args.scale)
    try:
        if args.scale:
            corpus = work / "corpus"
            files, total = make_corpus(corpus, args.scale)
            print(f"corpus: {files} files, {total / MB:.1f} MB in {work}")
        print(f"  {'figure':<44} {'plain':>12} {'cafs':>12} {'unit':<8} {'ratio':>7}  target")
        if args.scale:
            throughput_rows(report, work, corpus, args.scale)
        if args.write_files or args.creates or args.dd_mib:
            write_rows(report, work, args.write_files, args.creates, args.dd_mib, args.repeat,
                       args.floor, tuple(int(level) for level in args.ingest_levels.split(",")
                                         if level.strip()))
        if args.scale_artifacts:
            scale_rows(report, work, args.scale_artifacts)
        if args.fair_run_artifacts or args.fair_truncate_gib or args.fair_tag_layers:
            fairness_rows(report, work, args.fair_run_artifacts, args.fair_truncate_gib,
                          args.fair_tag_layers)
    finally:
        for mnt in work.glob("*mnt"):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for note in report.notes:
        print(f"note: {note}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "scale": report.scale,
        "rows": [dict(asdict(row), ratio=row.ratio) for row in report.rows],
        "notes": report.notes,
    }, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
