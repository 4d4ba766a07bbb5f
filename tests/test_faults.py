"""Fault injection into the running daemon with libfiu (fiu-run -x preloads its POSIX wrappers;
fiu-ctrl turns failures on and off in the live process).

For each fault: the writer sees an errno (at open, write, fsync or close), nothing partial is
published, the daemon keeps serving, and once the fault is off everything written afterwards
works and `cafs fsck --full` finds no damage.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    CAFS,
    Mount,
    cafs,
    is_mounted,
    require_fuse,
    unmount_whatever_state,
    write_artifact,
)


class FaultyDaemon:
    """A daemon started under fiu-run, in the foreground, as this test's child."""

    def __init__(self, mount: Mount, control: Path) -> None:
        self.mount = mount
        self.control = control
        with open(mount.store.parent / "fiu-daemon.log", "ab") as log:
            self.process = subprocess.Popen(
                ["fiu-run", "-x", "-f", str(control), *CAFS, "mount", "--store",
                 str(mount.store), "--foreground", str(mount.mountpoint)],
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while not is_mounted(mount.mountpoint):
            assert self.process.poll() is None, "the daemon under fiu-run did not start"
            assert time.monotonic() < deadline, "the daemon under fiu-run did not mount"
            time.sleep(0.05)

    def fiu(self, command: str) -> None:
        # fiu-run -x execs the program: the daemon is our child's pid itself.
        subprocess.run(["fiu-ctrl", "-f", str(self.control), "-c", command,
                        str(self.process.pid)], check=True, timeout=30)

    def alive(self) -> bool:
        return self.process.poll() is None and is_mounted(self.mount.mountpoint)

    def stop(self) -> None:
        cafs("umount", str(self.mount.mountpoint))
        assert self.process.wait(timeout=60) == 0


@pytest.fixture
def faulty(unstarted_mount: Mount, tmp_path: Path) -> Iterator[FaultyDaemon]:
    if shutil.which("fiu-run") is None:
        pytest.fail("fiu-run is not installed (scripts/setup installs fiu-utils and libfiu0)")
    require_fuse()
    unstarted_mount.store.mkdir(mode=0o700)
    daemon = FaultyDaemon(unstarted_mount, tmp_path / "fiu")
    try:
        yield daemon
    finally:
        unmount_whatever_state(unstarted_mount.mountpoint)
        if daemon.process.poll() is None:
            daemon.process.kill()
        daemon.process.wait(timeout=30)


def attempt(path: Path, data: bytes, fsync: bool) -> int | None:
    """Write a whole artifact: None if every call succeeded, else the errno of the first
    failure (from open, write, fsync or close)."""
    try:
        write_artifact(path, data, fsync=fsync)
    except OSError as exc:
        return exc.errno
    return None


def payloads() -> dict[str, bytes]:
    """Raw, compressible, small and empty: each goes down a different publish path."""
    rng = random.Random(os.urandom(8))  # new bytes each time: a dedup hit would publish nothing
    text = "".join(f"{rng.random():.6f},{rng.randrange(10**6)}\n" for _ in range(150_000))
    return {"raw": rng.randbytes(3 << 20), "text": text.encode(), "small": rng.randbytes(300)}


def check_after(daemon: FaultyDaemon, layer: Path, acked: dict[str, bytes],
                attempted: dict[str, bytes]) -> None:
    """The fault is off: every acknowledged artifact is whole; anything else there holds exactly
    what was written to it (an fsync can fail after its close-time publish succeeded); new
    writes work; the store has no damage."""
    assert daemon.alive(), "the daemon died of an injected fault"
    present = {path.name: path.read_bytes() for path in layer.iterdir()}
    for name, data in acked.items():
        assert present.get(name) == data, f"{name}: acknowledged, yet missing or different"
    for name, data in present.items():
        same = [other for other, written in attempted.items() if written == data]
        assert attempted.get(name) == data, f"{name}: holds bytes nobody wrote there ({same})"
    fresh = os.urandom(1 << 20)
    (layer / "after-the-fault").write_bytes(fresh)
    assert (layer / "after-the-fault").read_bytes() == fresh
    daemon.stop()
    assert list((daemon.mount.store / "tmp").iterdir()) == []
    report = daemon.mount.fsck("--full")
    assert report.returncode == 0, report.stdout + report.stderr
    log = (daemon.mount.store.parent / "fiu-daemon.log").read_text(errors="replace")
    assert "Traceback" not in log and "CRITICAL" not in log, log[-3000:]


FAULTS = {
    "enospc-on-write": ("posix/io/rw/pwrite", errno.ENOSPC),
    "eio-on-fsync": ("posix/io/sync/fsync", errno.EIO),
    "eio-on-rename": ("posix/io/dir/rename", errno.EIO),
    "emfile-on-open": ("posix/io/oc/open", errno.EMFILE),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_reaches_the_writer_and_publishes_nothing(faulty: FaultyDaemon,
                                                            fault: str) -> None:
    name, code = FAULTS[fault]
    layer = faulty.mount.layer()
    acked: dict[str, bytes] = {}
    attempted: dict[str, bytes] = {}
    faulty.fiu(f"enable name={name},failinfo={code}")
    failures = {}
    for kind, data in payloads().items():
        for fsync in (False, True):
            artifact = f"{kind}-{'fsync' if fsync else 'close'}"
            attempted[artifact] = data
            failure = attempt(layer / artifact, data, fsync)
            if failure is None:
                acked[artifact] = data
            else:
                failures[artifact] = failure
    faulty.fiu(f"disable name={name}")
    # Every write that must touch the failing call saw its errno; none saw another one.
    assert failures, f"{fault}: no writer saw a failure"
    assert set(failures.values()) <= {code, errno.EIO}, failures
    check_after(faulty, layer, acked, attempted)


def test_random_io_faults_under_load(faulty: FaultyDaemon) -> None:
    """2% of the store's reads, writes, fsyncs, renames and opens fail with a random errno."""
    layer = faulty.mount.layer()
    acked: dict[str, bytes] = {}
    attempted: dict[str, bytes] = {}
    points = ["posix/io/rw/pwrite", "posix/io/rw/pread", "posix/io/sync/fsync",
              "posix/io/sync/fdatasync", "posix/io/dir/rename", "posix/io/oc/open",
              "posix/io/dir/unlink"]
    for point in points:
        faulty.fiu(f"enable_random name={point},probability=0.02")
    rng = random.Random(6)
    failures = 0
    for index in range(120):
        data = rng.randbytes(rng.choice([0, 100, 70_000, 1 << 20]))
        artifact = f"a{index}"
        attempted[artifact] = data
        outcome = attempt(layer / artifact, data, fsync=index % 5 == 0)
        if outcome is None:
            acked[artifact] = data
        else:
            failures += 1
        if index % 7 == 0 and acked:  # reads too: a failed read is an errno, never wrong bytes
            victim = rng.choice(sorted(acked))
            with contextlib.suppress(OSError):
                assert (layer / victim).read_bytes() == acked[victim]
    for point in points:
        faulty.fiu(f"disable name={point}")
    print(f"random faults: {failures} of 120 writes failed")
    assert failures and len(acked) > 30
    check_after(faulty, layer, acked, attempted)
