"""The remote back ends the tests run against, started by the tests themselves.

CAFS_TEST_BACKEND = local (default) | postgresql | s3 | postgresql+s3 chooses what the real-mount
tests' stores use: an autouse fixture in conftest.py writes a per-test cafs.toml naming them and
points CAFS_CONFIG at it, so every `cafs ...` a test runs uses them. Tests of the back ends
themselves (contract and fault tests) start the servers through the same session fixtures,
whatever CAFS_TEST_BACKEND says. Each back end's part is separate below.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BACKEND = os.environ.get("CAFS_TEST_BACKEND", "local")


def uses(backend: str) -> bool:
    """Whether the real-mount tests run on this remote back end (postgresql, s3)."""
    return backend in BACKEND.split("+")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- PostgreSQL -----------------------------------------------------------------------------


def pg_bindir() -> Path:
    """The server's binaries: `pg_config --bindir` where it names the server's, else the newest
    /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH)."""
    found = shutil.which("pg_config")
    if found is not None:
        bindir = Path(subprocess.run([found, "--bindir"], capture_output=True, text=True,
                                     check=False).stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda path: int(path.parent.parent.name))
    if not versions:
        pytest.fail("PostgreSQL is not installed (scripts/setup installs it: apt postgresql)")
    return versions[-1].parent


@dataclass
class PgCluster:
    """A throw-away PostgreSQL cluster on a free loopback port, owned by user postgres."""

    bindir: Path
    data: Path
    port: int
    log: Path
    _names = itertools.count(1)

    def _as_postgres(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True,
                              text=True, check=check, timeout=60)

    def start(self) -> None:
        self._as_postgres(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
            "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data} "
                  "-c fsync=off -c max_connections=200", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                          "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str, port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{database}"

    def psql(self, database: str, sql: str) -> str:
        return subprocess.run(
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
             "postgres", "-At", "-d", database, "-c", sql],
            capture_output=True, text=True, check=True, timeout=60).stdout

    def new_database(self) -> str:
        name = f"cafs_{os.getpid()}_{next(self._names)}"
        self.psql("postgres", f"CREATE DATABASE {name}")
        return name


def start_pg_cluster(root: Path) -> PgCluster:
    bindir = pg_bindir()
    data = root / "data"
    data.mkdir(parents=True)
    shutil.chown(root, "postgres")
    shutil.chown(data, "postgres")
    os.chmod(root, 0o755)
    cluster = PgCluster(bindir, data, free_port(), root / "server.log")
    subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "initdb"), "-D", str(data),
                    "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"],
                   capture_output=True, text=True, check=True, timeout=120)
    cluster.log.touch()
    shutil.chown(cluster.log, "postgres")
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One cluster for the session (initdb + start ~1.5 s), stopped at its end."""
    root = Path(tempfile.mkdtemp(prefix="cafs-pg-"))
    try:
        cluster = start_pg_cluster(root)
        try:
            yield cluster
        finally:
            cluster.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty database for one test."""
    return pg_cluster.url(pg_cluster.new_database())


def wait_for_pg(cluster: PgCluster, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            cluster.psql("postgres", "SELECT 1")
            return
        except subprocess.CalledProcessError:
            time.sleep(0.1)
    raise AssertionError("PostgreSQL did not come back")
