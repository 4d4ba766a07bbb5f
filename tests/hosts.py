"""Several hosts on one store, played on this machine: each "host" is a daemon with its own
store directory (lock, log, control socket, tmp/, blob cache) and mountpoint, and all of them
name the same PostgreSQL database and the same S3 prefix, as machines sharing a store do.

The servers are the session's (backends.pg_cluster, backends.weed); each test gets a fresh
database and prefix. Started whatever CAFS_TEST_BACKEND says: several hosts need both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import PgCluster, WeedServer
from conftest import Mount, require_fuse, unmount_whatever_state


class Host(Mount):
    """One host's mount of the shared store; `env` carries its configuration."""

    def __init__(self, name: str, root: Path, config_lines: list[str]) -> None:
        mountpoint = root / "mnt"
        mountpoint.mkdir(parents=True)
        super().__init__(root / "store", mountpoint)
        self.name = name
        config = root / "cafs.toml"
        config.write_text("".join(f"{line}\n" for line in config_lines))
        self.env = {"CAFS_CONFIG": str(config)}

    def command_env(self) -> dict[str, str]:
        """The environment for a `cafs ...` command run on this host."""
        return {**os.environ, **(self.env or {})}


class Shared:
    """The servers every host names: one database, one S3 prefix."""

    def __init__(self, pg_cluster: PgCluster, weed: WeedServer) -> None:
        self.pg = pg_cluster
        self.database = pg_cluster.new_database()
        self.config = [f'manifest = "{pg_cluster.url(self.database)}"',
                       f'blobs = "{weed.url(weed.new_prefix())}"']

    def sql(self, query: str) -> list[list[str]]:
        """Rows of a query on the shared manifest, each a list of text fields."""
        return [line.split("|") for line in self.pg.psql(self.database, query).splitlines()]

    def count(self, query: str) -> int:
        return int(self.sql(query)[0][0])


def shared_config(pg_cluster: PgCluster, weed: WeedServer) -> list[str]:
    """cafs.toml lines naming a fresh database and a fresh S3 prefix, for every host."""
    return Shared(pg_cluster, weed).config


@contextlib.contextmanager
def running_hosts(root: Path, config: list[str]) -> Iterator[list[Host]]:
    """Hosts a and b mounted on one shared store (a first: it makes the store), each unmounted
    and checked clean at the end."""
    require_fuse()
    made = [Host(name, root / f"host-{name}", config) for name in ("a", "b")]
    try:
        for host in made:
            host.start()
        yield made
    finally:
        for host in made:
            unmount_whatever_state(host.mountpoint)
    for host in made:
        host.assert_clean()


@pytest.fixture
def hosts(tmp_path: Path, pg_cluster: PgCluster, weed: WeedServer) -> Iterator[list[Host]]:
    """Two hosts, a and b, mounted on one shared store."""
    with running_hosts(tmp_path, shared_config(pg_cluster, weed)) as made:
        yield made


# Short enough for tests: a session is dead 2 s after its last beat (beats every 0.5 s), and gc
# keeps an unreferenced blob or an orphan object for 2 s.
QUICK = ["session_timeout = 2", "gc_grace = 2"]


@pytest.fixture
def shared(pg_cluster: PgCluster, weed: WeedServer) -> Shared:
    return Shared(pg_cluster, weed)


@pytest.fixture
def quick_hosts(tmp_path: Path, shared: Shared) -> Iterator[list[Host]]:
    """Two hosts on one shared store with short session timeouts and gc grace (QUICK)."""
    with running_hosts(tmp_path, shared.config + QUICK) as made:
        yield made
