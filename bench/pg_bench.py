"""4 KiB creates per second on a mount whose manifest is on PostgreSQL, against the same on
SQLite, with one and with four writers: interleaved rounds, best of each, the load average
printed with them (the machine is shared: compare within a run, never across runs).

Starts a throw-away PostgreSQL cluster on a free loopback port (as user postgres: run as root;
needs the server from apt, see scripts/setup) and stops it at the end. Usage:
    .venv/bin/python bench/pg_bench.py [--files N] [--rounds R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CAFS = [sys.executable, "-m", "cafs"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pg_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda path: int(path.parent.parent.name))
    if not found:
        sys.exit("PostgreSQL is not installed (scripts/setup installs it)")
    return found[-1].parent


def as_postgres(*args: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True,
                   capture_output=True, timeout=120)


@contextmanager
def cluster(root: Path, *options: str) -> Iterator[int]:
    """A cluster as an operator would run one for cafs: fsync on (durable commits).
    `options`: more server settings (`-c name=value`)."""
    bindir, data, port = pg_bindir(), root / "pg", free_port()
    data.mkdir()
    shutil.chown(root, "postgres")
    shutil.chown(data, "postgres")
    as_postgres(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                "-E", "UTF8", "--locale=C")
    as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-w", "-o",
                " ".join((f"-c listen_addresses=127.0.0.1 -p {port} -k {data}", *options)),
                "start")
    try:
        yield port
    finally:
        as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")


def create_files(directory: Path, count: int, tag: int) -> None:
    payload = os.urandom(4096 - 16)
    for index in range(count):
        with open(directory / f"f{index:06d}", "wb") as file:
            file.write(payload + tag.to_bytes(8, "little") + index.to_bytes(8, "little"))


def creates_per_second(mountpoint: Path, run: str, files: int, writers: int) -> float:
    layers = []
    for writer in range(writers):
        layer = mountpoint / "runs" / run / f"w{writer}"
        layer.mkdir(parents=True)
        layers.append(layer)
    threads = [threading.Thread(target=create_files, args=(layer, files // writers, index))
               for index, layer in enumerate(layers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return (files // writers) * writers / (time.perf_counter() - started)


@contextmanager
def mounted(store: Path, mountpoint: Path, manifest: str | None) -> Iterator[None]:
    env = dict(os.environ, CAFS_CONFIG="")
    env.pop("CAFS_MANIFEST", None)
    args = [*CAFS, "mount", "--store", str(store), str(mountpoint)]
    if manifest:
        args[4:4] = ["--manifest", manifest]
    subprocess.run(args, check=True, env=env, timeout=120)
    try:
        yield
    finally:
        subprocess.run([*CAFS, "umount", str(mountpoint)], check=True, env=env, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000, help="files per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best kept)")
    parser.add_argument("--json", type=Path, default=None)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cafs-pg-bench-"))
    os.chmod(work, 0o755)
    best: dict[tuple[str, int], float] = {}
    loads = []
    try:
        pgroot = work / "pgroot"
        pgroot.mkdir()
        with cluster(pgroot) as port:
            subprocess.run([str(pg_bindir() / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                            "-U", "postgres", "cafs"], check=True)
            backends = {"sqlite": None, "postgresql": f"postgresql://postgres@127.0.0.1:{port}/cafs"}
            stores = {name: work / f"store-{name}" for name in backends}
            for round_number in range(options.rounds):
                for name, manifest in backends.items():
                    mountpoint = work / f"mnt-{name}"
                    mountpoint.mkdir(exist_ok=True)
                    with mounted(stores[name], mountpoint, manifest):
                        for writers in (1, 4):
                            rate = creates_per_second(
                                mountpoint, f"r{round_number}w{writers}", options.files, writers)
                            key = (name, writers)
                            best[key] = max(best.get(key, 0.0), rate)
                            loads.append(os.getloadavg()[0])
                            print(f"round {round_number + 1} {name:10} {writers} writer(s): "
                                  f"{rate:7.0f} creates/s (load {loads[-1]:.2f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbest of {options.rounds}, {options.files} files of 4 KiB per measurement; "
          f"load average during the runs {min(loads):.2f}-{max(loads):.2f}")
    print(f"{'writers':>8} {'SQLite':>10} {'PostgreSQL':>11} {'ratio':>6}")
    for writers in (1, 4):
        sqlite, pg = best[("sqlite", writers)], best[("postgresql", writers)]
        print(f"{writers:>8} {sqlite:>10.0f} {pg:>11.0f} {pg / sqlite:>6.2f}")
    if options.json is not None:
        options.json.write_text(json.dumps({
            "files": options.files, "rounds": options.rounds,
            "load": [min(loads), max(loads)],
            "creates_per_s": {f"{name}/{writers}": rate
                              for (name, writers), rate in best.items()}}, indent=2))


if __name__ == "__main__":
    main()
