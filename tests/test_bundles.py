"""Bundles from strangers: a failed import never costs content anyone uses, and a hostile
bundle is refused whole — one clear line, exit code 1, no traceback, nothing imported, the
store fsck-clean — through the daemon (mounted) and under the store's lock (unmounted).

Every hostile bundle here is built in Python, byte for byte, next to the good one it spoils."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CAFS, Mount, cafs

T0 = 1_700_000_000_000_000_000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- building bundles ---------------------------------------------------------------------


def version(content: bytes, **extra: Any) -> dict[str, Any]:
    return {"sha256": sha(content), "size": len(content), "mode": 0o644, "uid": 0, "gid": 0,
            "mtime_ns": T0, "ctime_ns": T0, "content_type": None, "created_ns": T0,
            "replaced_ns": None, "published_at": "", **extra}


def entry(path: str, kind: str, **extra: Any) -> dict[str, Any]:
    return {"path": path, "kind": kind, "mode": 0o755 if kind != "file" else 0o644,
            "uid": 0, "gid": 0, "mtime_ns": T0, "ctime_ns": T0, "tags": {}, **extra}


def tags(**values: bytes) -> dict[str, str]:
    return {f"user.{name}": base64.b64encode(value).decode() for name, value in values.items()}


def good_header(contents: dict[str, bytes], name: str = "e1") -> dict[str, Any]:
    """A header as export writes it: runs/<name>/train/<file> for each content."""
    entries = [entry("train", "layer")]
    for leaf, data in contents.items():
        entries.append(entry(f"train/{leaf}", "file", versions=[version(data)]))
    blobs = {sha(data): len(data) for data in contents.values()}
    return {"format": "cafs-bundle", "format_version": 1, "exported_ns": T0,
            "execution": {**entry("", "execution"), "name": name, "sealed_ns": None,
                          "root_sha256": None},
            "entries": entries,
            "blobs": [{"sha256": digest, "size": size} for digest, size in sorted(blobs.items())]}


def member(name: str, data: bytes, **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, T0 // 10**9
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out.getvalue()


def bundle_members(header: dict[str, Any] | bytes, blobs: list[bytes]
                   ) -> list[tuple[tarfile.TarInfo, bytes]]:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return [member("cafs-bundle.json", text),
            *[member(f"blobs/{sha(data)}", data) for data in blobs]]


def bundle(header: dict[str, Any] | bytes, blobs: list[bytes]) -> bytes:
    return tar_bytes(bundle_members(header, blobs))


# -- running imports ----------------------------------------------------------------------


def run_import(store: Path, data: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CAFS, "import", "--store", str(store), "-", *args], input=data,
                          capture_output=True, timeout=300)


def blob_files(store: Path) -> set[str]:
    return {path.name for path in (store / "blobs").glob("??/*")}


def refused(store: Path, data: bytes, message: str, *args: str) -> str:
    """Import `data`; it must be refused with `message` and leave the store as it was."""
    before = blob_files(store)
    runs_before = set(os.listdir(store.parent / "mnt" / "runs")) if mounted(store) else None
    result = run_import(store, data, *args)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 1, (result.returncode, stderr)
    assert "Traceback" not in stderr and stderr.startswith("cafs: "), stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr, stderr
    assert blob_files(store) == before  # not one blob of it stays
    if runs_before is not None:
        assert set(os.listdir(store.parent / "mnt" / "runs")) == runs_before
    check = cafs("fsck", "--store", str(store), "--full", check=False)
    assert check.returncode == 0 and "orphan" not in check.stdout, check.stdout
    return stderr


def mounted(store: Path) -> bool:
    return (store.parent / "mnt" / "runs").exists()


@pytest.fixture(params=["mounted", "unmounted"])
def target(request: pytest.FixtureRequest, unstarted_mount: Mount) -> Iterator[Mount]:
    """A store with one artifact, imported into through the daemon or under the lock."""
    unstarted_mount.start()
    (unstarted_mount.layer("e0") / "kept.bin").write_bytes(b"already here\n")
    if request.param == "unmounted":
        unstarted_mount.stop()
    yield unstarted_mount
    unstarted_mount.stop()
    assert not unstarted_mount.log_problems()
    assert unstarted_mount.fsck("--full").returncode == 0


# -- finding 2: a failed import deletes only what nothing uses ----------------------------


def test_a_failed_import_leaves_content_written_meanwhile(mount: Mount) -> None:
    """A bundle cut short, imported (through the daemon) while someone writes, through the
    mount, content the bundle also holds: the writer's artifact stays readable."""
    shared = os.urandom(300_000)
    rest = os.urandom(2_000_000)
    data = bundle(good_header({"shared.bin": shared, "rest.bin": rest}), [shared, rest])
    cut = data.index(rest[:64]) + 500_000  # inside the second blob
    layer = mount.layer("e5")
    proc = subprocess.Popen([*CAFS, "import", "--store", str(mount.store), "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(data[:cut])
    proc.stdin.flush()
    blob = mount.store / "blobs" / sha(shared)[:2] / sha(shared)
    deadline = time.monotonic() + 30
    while not blob.exists():  # the import stored the shared content and waits for the rest
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    (layer / "victim").write_bytes(shared)  # close() succeeds: published, by dedup
    proc.stdin.close()  # the bundle ends here: the import fails
    assert proc.wait(timeout=60) is not None and proc.stderr is not None
    err = proc.stderr.read()
    assert (layer / "victim").read_bytes() == shared
    assert proc.returncode == 1 and b"Traceback" not in err, err
    assert b"truncated" in err, err
    assert not (mount.runs / "e1").exists()
    check = mount.fsck("--full")
    assert check.returncode == 0 and "orphan" not in check.stdout, check.stdout


def test_a_failed_unmounted_import_keeps_content_the_manifest_names(unstarted_mount: Mount
                                                                      ) -> None:
    """Unmounted: an artifact whose blob file went missing, and a truncated bundle holding
    that content. The import writes the blob again and then fails; the blob stays (a row
    names it), every other blob it stored goes."""
    mount = unstarted_mount
    mount.start()
    shared, other = os.urandom(100_000), os.urandom(400_000)
    (mount.layer("e0") / "victim").write_bytes(shared)
    mount.stop()
    os.unlink(mount.store / "blobs" / sha(shared)[:2] / sha(shared))
    assert f"blob {sha(shared)}: missing" in mount.fsck().stdout
    data = bundle(good_header({"a": shared, "b": other, "c": b"x" * 300_000}),
                  [shared, other, b"x" * 300_000])
    cut = data.index(b"x" * 1000) + 1000  # inside the last blob
    result = run_import(mount.store, data[:cut])
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr, stderr
    assert "truncated" in stderr, stderr
    assert blob_files(mount.store) == {sha(shared)}  # healed; `other` is gone again
    check = mount.fsck("--full")
    assert check.returncode == 0 and "orphan" not in check.stdout, check.stdout
    mount.start()
    assert (mount.runs / "e0" / "train" / "victim").read_bytes() == shared
    mount.stop()
    assert not mount.log_problems()
