"""Two hosts on one store (two daemons on this machine, one PostgreSQL, one loopback S3): how
soon what one host closed reads back on the other, and what the change feed costs a busy
writer.

    close -> open+read   A writes and closes a 64 KiB file; B opens and reads it until the
                         bytes are A's (new names, and overwrites of one name); the time from
                         A's close() returning to B's successful read. Targets: median <= 100
                         ms, p99 <= 1 s.
    feed overhead        4 KiB creates on A (B mounted, following), with the feed's triggers on
                         and with them disabled (ALTER TABLE ... DISABLE TRIGGER USER),
                         interleaved, best of N. Target: <= 10% fewer creates with the feed.
                         And the same through the manifest alone (a new file's row and its
                         publish, two transactions, as the daemon makes them): what the
                         triggers and the NOTIFY cost the database, without the FUSE and S3
                         work around it.

Run as root: scripts/bench --hosts [--rounds N] [--creates N] [--repeat N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import pg_bench  # noqa: E402
import write_figures  # noqa: E402
from backends import S3_ACCESS_KEY, S3_SECRET_KEY, start_weed, stop_weed  # noqa: E402
from cafs_bench import daemon_pid  # noqa: E402
from s3_bench import cpu_seconds  # noqa: E402

CAFS = [sys.executable, "-m", "cafs"]
TRIGGERS = ("nodes", "tags", "blobs")


@contextlib.contextmanager
def mounted(store: Path, mountpoint: Path, *flags: str) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CAFS_CONFIG="")
    subprocess.run([*CAFS, "mount", "--store", str(store), *flags, str(mountpoint)],
                   check=True, env=env, timeout=120)
    try:
        yield mountpoint
    finally:
        subprocess.run([*CAFS, "umount", str(mountpoint)], check=True, env=env, timeout=120)


def psql(port: int, sql: str) -> str:
    return subprocess.run([str(pg_bench.pg_bindir() / "psql"), "-h", "127.0.0.1", "-p",
                           str(port), "-U", "postgres", "-At", "-d", "cafs", "-c", sql],
                          capture_output=True, text=True, check=True, timeout=60).stdout


def feed_triggers(port: int, on: bool) -> None:
    verb = "ENABLE" if on else "DISABLE"
    psql(port, "; ".join(f"ALTER TABLE {table} {verb} TRIGGER USER" for table in TRIGGERS))


def read_until(path: Path, data: bytes, timeout: float = 5.0) -> float:
    """Seconds until `path` opens and reads as `data` (tried back to back)."""
    start = time.perf_counter()
    while True:
        try:
            with open(path, "rb") as file:
                if file.read() == data:
                    return time.perf_counter() - start
        except FileNotFoundError:
            pass
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"{path} did not read back within {timeout} s")


def close_to_open(a: Path, b: Path, rounds: int, size: int) -> dict[str, list[float]]:
    """Seconds from A's close() to B's successful open+read, per round, for new names and for
    overwrites of one name."""
    (a / "runs" / "lat" / "l").mkdir(parents=True)
    layer_a, layer_b = a / "runs" / "lat" / "l", b / "runs" / "lat" / "l"
    while not layer_b.is_dir():  # B learns of the new directories first
        time.sleep(0.01)
    times: dict[str, list[float]] = {"new name": [], "overwrite": []}
    for i in range(rounds):
        for kind, name in (("new name", f"n{i}"), ("overwrite", "same")):
            data = os.urandom(size)
            with open(layer_a / name, "wb") as file:
                file.write(data)
            times[kind].append(read_until(layer_b / name, data))
    return times


def manifest_rate(url: str, files: int, writers: int, tag: str) -> float:
    """Files per second of `writers` threads, each on its own connection, each making new
    files as the daemon does: the row, then the publish of a version."""
    from cafs.digest import digest_of_bytes
    from cafs.manifest_api import NewVersion
    from cafs.model import RUNS_INODE, Kind, StoredBlob
    from cafs.pg_manifest import PgManifest

    manifests = [PgManifest(url) for _ in range(writers)]
    execution = manifests[0].add_node(RUNS_INODE, f"m{tag}", Kind.EXECUTION, 0o755, 0, 0, 1)
    layers = [manifests[0].add_node(execution.ino, f"w{w}", Kind.LAYER, 0o755, 0, 0, 1)
              for w in range(writers)]

    def work(index: int) -> None:
        manifest, layer = manifests[index], layers[index]
        for i in range(files):
            data = f"{tag}/{index}/{i}".encode()
            node = manifest.add_node(layer.ino, f"f{i}", Kind.FILE, 0o644, 0, 0, 1)
            now = time.time_ns()
            manifest.publish(StoredBlob(digest_of_bytes(data), len(data), len(data), "raw"),
                             NewVersion(node.ino, 0o644, 0, 0, now, now, None, now))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    for manifest in manifests:
        manifest.close()
    return files * writers / seconds


def feed_cost(a: Path, pids: dict[str, int], port: int, args: argparse.Namespace,
              label: str) -> None:
    """4 KiB creates per second on A with the feed's triggers on and off, interleaved, best
    of args.repeat; and the CPU each daemon spent per create."""
    for writers in (1, 4):
        rates: dict[str, list[float]] = {"feed": [], "no feed": []}
        cpu = {(name, host): 0.0 for name in rates for host in pids}
        for round_no in range(args.repeat):
            for name, on in (("feed", True), ("no feed", False)):
                feed_triggers(port, on)
                target = a / "runs" / (f"c{len(pids)}-{writers}-{name.replace(' ', '')}-"
                                       f"{round_no}")
                target.mkdir()
                before = {host: cpu_seconds(pid) for host, pid in pids.items()}
                rate = write_figures.create_rate({name: target}, args.creates, writers, 1)
                for host, pid in pids.items():
                    cpu[name, host] += cpu_seconds(pid) - before[host]
                rates[name].append(rate[name])
        feed_triggers(port, True)
        with_feed, without = max(rates["feed"]), max(rates["no feed"])
        loss = (1 - with_feed / without) * 100
        print(f"  4 KiB creates on A, {writers} writer(s), {label}: with the feed "
              f"{with_feed:,.0f}/s, without {without:,.0f}/s: {loss:+.1f}% lost "
              f"(target <= 10%: {'met' if loss <= 10 else 'MISSED'}); all rounds: "
              f"{_rounded(rates['feed'])} vs {_rounded(rates['no feed'])}")
        made = args.creates * writers * args.repeat
        print("    daemon CPU ms per create, with / without the feed: " + ", ".join(
            f"{host} {cpu['feed', host] / made * 1000:.2f} / "
            f"{cpu['no feed', host] / made * 1000:.2f}" for host in pids))


def _rounded(values: list[float]) -> str:
    return "/".join(f"{value:.0f}" for value in values)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--size", type=int, default=64 << 10)
    parser.add_argument("--creates", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cafs-hosts-bench-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    (work / "weed").mkdir()
    (work / "pgroot").mkdir()
    server = start_weed(work / "weed")
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = (S3_ACCESS_KEY,
                                                                            S3_SECRET_KEY)
    stack = contextlib.ExitStack()
    try:
        print(f"load average at the start: {write_figures.load_average()}")
        port = stack.enter_context(pg_bench.cluster(work / "pgroot"))
        subprocess.run([str(pg_bench.pg_bindir() / "createdb"), "-h", "127.0.0.1", "-p",
                        str(port), "-U", "postgres", "cafs"], check=True)
        flags = ("--manifest", f"postgresql://postgres@127.0.0.1:{port}/cafs",
                 "--blobs", server.url("hosts"))
        a = stack.enter_context(mounted(work / "store-a", work / "ma", *flags))
        pids = {"A": daemon_pid(work / "store-a")}
        with mounted(work / "store-b", work / "mb", *flags) as b:
            times = close_to_open(a, b, args.rounds, args.size)
            every = [t for values in times.values() for t in values]
            for kind, values in [*times.items(), ("all", every)]:
                median, p99 = statistics.median(values) * 1000, percentile(values, 0.99) * 1000
                print(f"  close on A -> open+read on B, {kind:<9} ({len(values)}, "
                      f"{args.size >> 10} KiB): median {median:7.2f} ms, p99 {p99:7.2f} ms, "
                      f"max {max(values) * 1000:7.2f} ms")
            median, p99 = statistics.median(every) * 1000, percentile(every, 0.99) * 1000
            print(f"  target median <= 100 ms: {'met' if median <= 100 else 'MISSED'}; "
                  f"p99 <= 1000 ms: {'met' if p99 <= 1000 else 'MISSED'}")
            feed_cost(a, {**pids, "B": daemon_pid(work / "store-b")}, port, args,
                      "B following on this machine")
        feed_cost(a, pids, port, args, "A alone")
        url = f"postgresql://postgres@127.0.0.1:{port}/cafs"
        for writers in (1, 4):
            rates: dict[str, list[float]] = {"feed": [], "no feed": []}
            for round_no in range(args.repeat):
                for name, on in (("feed", True), ("no feed", False)):
                    feed_triggers(port, on)
                    rates[name].append(manifest_rate(url, args.creates, writers,
                                                     f"{writers}{name[0]}{round_no}"))
            feed_triggers(port, True)
            with_feed, without = max(rates["feed"]), max(rates["no feed"])
            loss = (1 - with_feed / without) * 100
            print(f"  manifest alone (row + publish), {writers} writer(s): with the feed "
                  f"{with_feed:,.0f} files/s, without {without:,.0f}/s: {loss:+.1f}% lost; "
                  f"all rounds: {_rounded(rates['feed'])} vs {_rounded(rates['no feed'])}")
        rows = psql(port, "SELECT count(*) FROM cafs_changes").strip()
        print(f"  change rows kept: {rows} (trimmed after 5 minutes)")
        print(f"load average at the end: {write_figures.load_average()}")
    finally:
        stack.close()
        stop_weed(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
