"""The benchmark harness runs on a tiny corpus so it cannot rot. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
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
