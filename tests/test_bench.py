"""The benchmark harness runs on a tiny corpus so it cannot rot. No timing is asserted."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import require_fuse

ROOT = Path(__file__).resolve().parent.parent


def test_bench_harness_runs_on_a_tiny_corpus(tmp_path: Path) -> None:
    require_fuse()
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cafs_bench.py"), "--scale", "0.01",
         "--scale-artifacts", "2000", "--write-files", "6", "--creates", "20",
         "--dd-mib", "4", "--repeat", "1", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    figures = {row["figure"].split(":")[0] for row in report["rows"]}
    assert {"ingest", "cold sequential read of everything", "warm re-read of everything",
            "find/stat walk of everything", "space"} <= figures
    assert any(row["figure"].startswith("random 4 KiB reads") for row in report["rows"])
    assert any(row["figure"].startswith("scale 2,000: mount serves") for row in report["rows"])
    for row in report["rows"]:
        assert row["cafs"] > 0, row
    assert not list((tmp_path / "work").iterdir())  # cleaned up, nothing left mounted


def test_the_hosts_bench_runs_on_a_few_files() -> None:
    """scripts/bench --hosts: two hosts on one store (its own PostgreSQL and S3 servers)."""
    require_fuse()
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "hosts_bench.py"), "--rounds", "3",
         "--creates", "5", "--repeat", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "close on A -> open+read on B, all" in result.stdout
    assert "manifest alone (row + publish), 4 writer(s)" in result.stdout


def test_the_journaled_floor_keeps_and_applies_every_close(tmp_path: Path) -> None:
    """bench/null_fs.py --journal --apply, the write figures' best case of a journaled write
    path: every closed file is in its journal, in a blob file named by its SHA-256, and in its
    SQLite rows, once it has unmounted."""
    require_fuse()
    mountpoint, scratch = tmp_path / "mnt", tmp_path / "scratch"
    mountpoint.mkdir()
    daemon = subprocess.Popen([sys.executable, str(ROOT / "bench" / "null_fs.py"), str(mountpoint),
                               "--journal", "--apply", "--scratch", str(scratch)])
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            assert daemon.poll() is None and time.monotonic() < deadline, "null_fs did not mount"
            time.sleep(0.05)
        contents = {f"f{i}".encode(): os.urandom(4096 + i) for i in range(300)}
        for name, data in contents.items():
            (mountpoint / name.decode()).write_bytes(data)
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
        assert daemon.wait(timeout=30) == 0
    journal = (scratch / "journal").read_bytes()
    for data in contents.values():
        assert data in journal
    db = sqlite3.connect(scratch / "manifest.sqlite")
    rows = db.execute("SELECT n.name, b.sha256 FROM nodes n JOIN versions v ON v.id = n.version_id"
                      " JOIN blobs b ON b.id = v.blob_id").fetchall()
    assert {bytes(name): digest for name, digest in rows} == {
        name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    for name, digest in rows:
        assert (scratch / "blobs" / digest[:2] / digest).read_bytes() == contents[bytes(name)]


def test_the_write_figures_run_with_their_floors_and_compression_levels(tmp_path: Path) -> None:
    """scripts/bench --only-writes --floor --ingest-levels: every floor (the hash-only one
    too) and a cafs mount per compression level give a figure, and each daemon's CPU is noted."""
    require_fuse()
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cafs_bench.py"), "--only-writes", "--floor",
         "--write-files", "6", "--creates", "5", "--dd-mib", "2", "--repeat", "1",
         "--ingest-levels", "0,-3", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    figures = [row["figure"] for row in report["rows"]]
    hashed = "floor: only SHA-256 of the bytes"
    assert figures.count(hashed) == 4  # cp -r, creates with one writer and four, dd
    assert figures.count("floor: the same, hashed in a thread") == 4
    assert "write: the same cp -r, cafs -o compression=0 (raw)" in figures
    assert "write: the same cp -r, cafs -o compression=-3" in figures
    for row in report["rows"]:
        assert row["cafs"] > 0, row
    for name in ("cafs", "hash", "hash-thread", "cafs-0", "cafs--3"):
        assert any(note.startswith(f"ingest: {name} daemon CPU") for note in report["notes"])
    assert not list((tmp_path / "work").iterdir())  # cleaned up, nothing left mounted
