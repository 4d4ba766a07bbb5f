"""Several hosts mounting one store (PostgreSQL + S3): what one writes, the others read."""

from __future__ import annotations

import os
from pathlib import Path

from backends import PgCluster, WeedServer
from conftest import cafs, require_fuse, sha, unmount_whatever_state
from hosts import Host
from hosts import hosts as hosts  # the fixture


def test_what_a_writes_b_reads(hosts: list[Host]) -> None:
    a, b = hosts
    data = os.urandom(300_000)
    (a.layer("e1", "train") / "model.bin").write_bytes(data)
    read = (b.runs / "e1" / "train" / "model.bin").read_bytes()
    assert sha(read) == sha(data)


def test_a_new_store_directory_joins_only_the_same_blobs(hosts: list[Host],
                                                         weed: WeedServer) -> None:
    """A third host naming the same manifest but other blobs is refused (exit 3): its blobs
    would all look missing, and its gc would delete what the others stored."""
    a, _ = hosts
    (a.layer() / "x").write_bytes(b"x")
    config = (a.mountpoint.parent / "cafs.toml").read_text().splitlines()
    manifest = next(line for line in config if line.startswith("manifest"))
    other = Host("c", a.mountpoint.parent.parent / "host-c",
                 [manifest, f'blobs = "{weed.url(weed.new_prefix())}"'])
    result = cafs("mount", "--store", str(other.store), str(other.mountpoint), check=False,
                  env=other.command_env())
    assert result.returncode == 3, result.stdout + result.stderr
    assert "blobs are at" in result.stderr
    assert "Traceback" not in result.stderr


def _refused(host: Host) -> str:
    result = cafs("mount", "--store", str(host.store), str(host.mountpoint), check=False,
                  env=host.command_env())
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_a_host_that_forgets_the_shared_manifest_is_refused(hosts: list[Host]) -> None:
    """A host configured with the shared blobs but no `manifest =` would start its own
    manifest.sqlite, take every blob for an orphan, and its gc would delete them all: the
    prefix says whose blobs it holds, and the mount is refused."""
    a, b = hosts
    data = os.urandom(50_000)
    (a.layer() / "kept.bin").write_bytes(data)
    config = (a.mountpoint.parent / "cafs.toml").read_text().splitlines()
    blobs = next(line for line in config if line.startswith("blobs"))
    careless = Host("c", a.mountpoint.parent.parent / "host-c", [blobs])
    assert "holds the blobs of another store" in _refused(careless)
    # Its gc, run anyway, is refused too: nothing of a's is deleted.
    result = cafs("gc", "--store", str(careless.store), check=False, env=careless.command_env())
    assert result.returncode != 0
    assert sha((b.runs / "e1" / "train" / "kept.bin").read_bytes()) == sha(data)


def test_another_database_on_the_same_blobs_is_refused(hosts: list[Host],
                                                        pg_cluster: PgCluster) -> None:
    a, _ = hosts
    (a.layer() / "x").write_bytes(b"x")
    config = (a.mountpoint.parent / "cafs.toml").read_text().splitlines()
    blobs = next(line for line in config if line.startswith("blobs"))
    other = Host("c", a.mountpoint.parent.parent / "host-c",
                 [f'manifest = "{pg_cluster.url(pg_cluster.new_database())}"', blobs])
    # Refused before any manifest is made in the new database: its blobs are not its own.
    message = _refused(other)
    assert "holds no cafs manifest, yet the store has blob files" in message
    assert cafs("stats", "--store", str(a.store), env=a.command_env()).returncode == 0


def test_two_stores_on_one_empty_prefix_are_told_apart(tmp_path: Path,
                                                       weed: WeedServer) -> None:
    """Each store's own manifest.sqlite, one S3 prefix: the first store claims it even while
    it holds no blob, and the second is refused before it stores anything."""
    require_fuse()
    blobs = f'blobs = "{weed.url(weed.new_prefix())}"'
    first = Host("one", tmp_path / "one", [blobs])
    second = Host("two", tmp_path / "two", [blobs])
    try:
        first.start()
        first.stop()
        assert "holds the blobs of another store" in _refused(second)
        first.start()
        (first.layer() / "f").write_bytes(b"first")
        first.stop()
    finally:
        unmount_whatever_state(first.mountpoint)
    first.assert_clean()
