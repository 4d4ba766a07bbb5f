"""History through a real mount: a path keeps every version it held through renames (rsync's
temp file, `mv` over it, an editor's save, `cp` over it, rm then re-create), per-path version
numbers 1..n that gc never renumbers and two writers never share, and `cafs stats` numbers
checked against what the test computes itself from the files it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

from conftest import CAFS, Mount, cafs, sh, sha, xattr


def cafs_bytes(*args: str) -> bytes:
    result = subprocess.run([*CAFS, *args], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def log_of(path: Path | str, *store: str) -> list[dict]:
    return json.loads(cafs("log", "--json", *store, str(path)).stdout)["versions"]


def shas(path: Path | str, *store: str) -> list[str]:
    return [version["sha256"] for version in log_of(path, *store)]


def numbers(path: Path | str, *store: str) -> list[int]:
    return [version["version"] for version in log_of(path, *store)]


def assert_every_version_readable(path: Path, contents: list[bytes]) -> None:
    """`cafs log` lists exactly these contents as versions 1..n, oldest first, the last one
    current, and `cafs cat PATH@N` gives each back."""
    versions = log_of(path)
    assert [v["sha256"] for v in versions] == [sha(c) for c in contents]
    assert [v["version"] for v in versions] == list(range(1, len(contents) + 1))
    assert [v["current"] for v in versions] == [False] * (len(contents) - 1) + [True]
    for number, content in enumerate(contents, start=1):
        assert cafs_bytes("cat", f"{path}@{number}") == content
    assert xattr(path, "user.cafs.version") == str(len(contents))


# -- history follows a path through renames --------------------------------------------------


def test_three_rsyncs_of_a_changing_file_leave_three_versions(mount: Mount, tmp_path: Path
                                                              ) -> None:
    layer = mount.layer("e", "l")
    source = tmp_path / "src"
    source.mkdir()
    contents = [f"lr: {rate}\nepochs: 10\n".encode() for rate in (0.1, 0.01, 0.001)]
    for content in contents:
        (source / "cfg.yaml").write_bytes(content)
        sh(f"rsync -a {source}/cfg.yaml {layer}/cfg.yaml")  # .cfg.yaml.XXXXXX, then rename
    assert (layer / "cfg.yaml").read_bytes() == contents[-1]
    assert_every_version_readable(layer / "cfg.yaml", contents)
    assert sorted(os.listdir(layer)) == ["cfg.yaml"]


def test_mv_over_a_file_twice_keeps_every_version_it_held(mount: Mount) -> None:
    layer = mount.layer()
    (layer / "b").write_bytes(b"b: the first\n")
    (layer / "a").write_bytes(b"a: one\n")
    sh(f"mv {layer}/a {layer}/b")
    (layer / "a").write_bytes(b"a: two\n")
    sh(f"mv {layer}/a {layer}/b")
    assert_every_version_readable(layer / "b", [b"b: the first\n", b"a: one\n", b"a: two\n"])
    # The versions went with the file: nothing is left under the old name.
    gone = cafs("log", str(layer / "a"), check=False)
    assert gone.returncode == 1 and "no such artifact" in gone.stderr
