"""Nothing acknowledged is lost: the manifest against other processes opening it, a damaged
WAL, a missing or empty manifest, backups and their restore, orphan blobs and gc's grace, and
a disk filled through the mount by another user (issue 11, findings 1, 4 and 6)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from conftest import Mount, cafs, write_artifact

SQLITE_UTILS = str(Path(sys.executable).with_name("sqlite-utils"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(name: str, size: int = 20_000) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def write_files(layer: Path, names: list[str]) -> dict[str, str]:
    written = {}
    for name in names:
        data = payload(name)
        write_artifact(layer / name, data)
        written[name] = sha(data)
    return written


def present(layer: Path, expected: dict[str, str]) -> dict[str, str]:
    """Which of the expected artifacts are there with their exact content."""
    found = {}
    for name, digest in expected.items():
        path = layer / name
        if path.exists() and sha(path.read_bytes()) == digest:
            found[name] = digest
    return found


# -- finding 1: another process opening the manifest ------------------------------------------


def test_an_sqlite_tool_opening_the_manifest_after_an_fsync_loses_nothing(
        unstarted_mount: Mount) -> None:
    """fsync, then `sqlite-utils query` on the live manifest (a read-write opener), then more
    writes and kill -9: every artifact whose close() returned is there after the restart."""
    mount = unstarted_mount
    mount.start()
    layer = mount.layer()
    write_artifact(layer / "synced", payload("synced"), fsync=True)
    manifest = str(mount.store / "manifest.sqlite")
    # Read-write openers that close their connection (the sqlite3 shell, a script): the last
    # to close checkpoints and deletes the WAL if it believes it is alone.
    for command in ([SQLITE_UTILS, "query", manifest, "select 1"],
                    ["sqlite3", manifest, "select count(*) from nodes"],
                    [sys.executable, "-c", "import sqlite3, sys; "
                     "sqlite3.connect(sys.argv[1]).execute('select 1').connection.close()",
                     manifest]):
        query = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert query.returncode == 0, query.stderr
    written = write_files(layer, [f"after-{index}" for index in range(5)])
    stats = json.loads(cafs("stats", "--store", str(mount.store), "--json").stdout)
    assert stats["artifacts"] == 6, stats
    mount.kill9()
    mount.start()
    assert present(layer, written) == written
    assert (layer / "synced").read_bytes() == payload("synced")
    mount.stop()
    report = mount.fsck("--full")
    assert report.returncode == 0 and "orphan" not in report.stdout, report.stdout
