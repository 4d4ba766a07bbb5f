"""Several hosts mounting one store (PostgreSQL + S3): what one writes, the others read."""

from __future__ import annotations

import os

from backends import WeedServer
from conftest import cafs, sha
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
