"""fsx-style model checking (see tests/fsx_model.py): every read of a randomly driven file is
compared with an in-memory model, on a plain directory (which proves the exerciser right) and on
a cafs mount, across clean remounts and kill -9 of the daemon after an fsync.

CI runs a few seeds (about half a minute). CAFS_SOAK=1 runs many more seeds with longer
sequences and larger files (CAFS_FSX_SOAK_SEEDS, CAFS_FSX_SOAK_OPS). A failure prints its seed;
CAFS_FSX_SEED (with CAFS_FSX_OPS and CAFS_FSX_MAX_LEN) replays exactly that sequence.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import Mount
from fsx_model import Config, Exerciser, FsxFailure, KiB, Target

soak = pytest.mark.skipif(not os.environ.get("CAFS_SOAK"),
                          reason="long fsx runs: opt in with CAFS_SOAK=1")


def replayed() -> list[Config] | None:
    """The configuration a failure printed (CAFS_FSX_SEED=...), if one is asked for."""
    if "CAFS_FSX_SEED" not in os.environ:
        return None
    return [Config(seed=int(os.environ["CAFS_FSX_SEED"]),
                   ops=int(os.environ.get("CAFS_FSX_OPS", "2000")),
                   max_len=int(os.environ.get("CAFS_FSX_MAX_LEN", str(256 * KiB))),
                   remounts=int(os.environ.get("CAFS_FSX_REMOUNTS", "2")),
                   crashes=int(os.environ.get("CAFS_FSX_CRASHES", "2")))]


# Three sequences on one mount (a restart costs seconds; the operations, milliseconds): two on a
# small file (hashing and copy-on-write stay on the event loop below 1 MiB) and one on a file
# larger than a zstd frame (1 MiB; the work goes to a thread), so reads straddle frames and the
# 64 KiB checksum blocks of raw blobs. Between them: a clean remount, two kill -9 after fsync,
# and a remount at the end that every file must survive.
CI_CONFIGS = replayed() or [
    Config(seed=1, ops=1500, crashes=1, final_remount=False),
    Config(seed=2, ops=1500, remounts=1, final_remount=False),
    Config(seed=3, ops=500, max_len=2560 * KiB, max_op_len=512 * KiB, crashes=1,
           final_remount=False),
]


def exercise_cafs(mount: Mount, configs: list[Config], tmp_path: Path) -> None:
    """Run each configuration on its own file of one mount, remount, check every file again;
    then the daemon must have logged nothing wrong and fsck must find nothing."""

    def restart(crash: bool) -> None:
        if crash:
            mount.kill9()
        else:
            mount.stop()
        mount.start()

    mount.start()
    done = []
    for config in configs:
        layer = mount.layer("fsx", f"seed{config.seed}")
        exerciser = Exerciser(Target(layer / "file", restart=restart, cafs=True), config,
                              report_dir=tmp_path)
        started = time.monotonic()
        counts = exerciser.run()
        print(f"fsx seed {config.seed}: {config.ops} ops in {time.monotonic() - started:.1f} s "
              f"on cafs: {counts}")
        done.append(exerciser)
    restart(False)
    for exerciser in done:
        exerciser.check_again("after the last remount")
    mount.stop()
    assert not mount.log_problems(), mount.log()
    report = mount.fsck("--full")
    assert report.returncode == 0, report.stdout + report.stderr


def test_fsx_on_a_plain_directory(tmp_path: Path) -> None:
    """The exerciser itself is right: the same sequences pass on the machine's own filesystem
    (ext4 here, which supports every operation the exerciser knows)."""
    for config in CI_CONFIGS:
        work = tmp_path / f"seed{config.seed}"
        work.mkdir()
        exerciser = Exerciser(Target(work / "file"), config, report_dir=work)
        counts = exerciser.run()
        print(f"fsx seed {config.seed} on a plain directory: {counts}")
        # The models of the fallocate family are checked here too: ext4 and xfs support every
        # mode; tmpfs (a /tmp elsewhere) lacks zero, collapse and insert range.
        assert exerciser.skipped <= {"zero_range", "collapse_range", "insert_range"}, \
            exerciser.skipped


def test_fsx_on_cafs(unstarted_mount: Mount, tmp_path: Path) -> None:
    """Every read, size, mapped page and published hash matches the model, through clean
    remounts and kill -9 after fsync. cafs has no fallocate (FUSE answers EOPNOTSUPP), so the
    fallocate family is skipped after its first refusal, which must leave the file as it was."""
    exercise_cafs(unstarted_mount, CI_CONFIGS, tmp_path)


def test_fsx_catches_a_file_changed_behind_its_back(tmp_path: Path) -> None:
    """A test that cannot fail is worthless: bytes flipped, or the file shortened, by another
    descriptor in the middle of a run are reported with the seed and the replay line."""
    config = Config(seed=7, ops=300)

    def flip(number: int, path: Path) -> None:
        if number == 150:
            data = path.read_bytes()
            with open(path, "r+b") as out:
                out.write(bytes(b ^ 0xFF for b in data))

    def shorten(number: int, path: Path) -> None:
        if number == 150:
            os.truncate(path, max(0, path.stat().st_size - 1))

    for name, meddle in (("flip", flip), ("shorten", shorten)):
        work = tmp_path / name
        work.mkdir()
        with pytest.raises(FsxFailure) as caught:
            Exerciser(Target(work / "file", meddle=meddle), config, report_dir=work).run()
        message = str(caught.value)
        assert "seed 7" in message and "CAFS_FSX_SEED=7" in message, message
        assert (work / "fsx-7.good").exists() and (work / "fsx-7.log").exists()


def test_fsx_is_deterministic(tmp_path: Path) -> None:
    """The same seed replays the same operations: a printed seed reproduces a failure."""
    logs = []
    for attempt in ("a", "b"):
        work = tmp_path / attempt
        work.mkdir()
        exerciser = Exerciser(Target(work / "file"), Config(seed=11, ops=400))
        exerciser.run()
        logs.append(exerciser.log)
    assert logs[0] == logs[1]


@pytest.mark.soak
@soak
def test_fsx_soak_on_cafs(unstarted_mount: Mount, tmp_path: Path) -> None:
    """CAFS_FSX_SOAK_SEEDS sequences (default 20) of CAFS_FSX_SOAK_OPS operations (default
    20,000), every fourth on a file of up to 4 MiB, five remounts and five kill -9 each."""
    seeds = range(100, 100 + int(os.environ.get("CAFS_FSX_SOAK_SEEDS", "20")))
    ops = int(os.environ.get("CAFS_FSX_SOAK_OPS", "20000"))
    exercise_cafs(unstarted_mount, [
        Config(seed=seed, ops=ops, max_len=(4096 if seed % 4 == 0 else 256) * KiB,
               max_op_len=(512 if seed % 4 == 0 else 64) * KiB, remounts=5, crashes=5,
               final_remount=False)
        for seed in seeds], tmp_path)
