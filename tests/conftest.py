"""Fixtures: a real cafs mount in a daemon subprocess, started and stopped with the CLI.

Every mount fixture ends with checks that must find nothing: the daemon logged no error and no
traceback, and `cafs fsck --full` reports no damage. Real-mount tests skip only where FUSE is
missing, and never when CAFS_REQUIRE_FUSE is set (CI sets it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import BACKEND, current_pg, current_s3, pg_cluster, pg_url, s3_config_lines, uses  # noqa: F401  (fixtures for every test file)
from backends import weed as weed  # the session's S3 server, for every test that asks

CAFS = [sys.executable, "-m", "cafs"]
# Tests never read the machine's /etc/cafs/cafs.toml: each passes what it needs.
os.environ["CAFS_CONFIG"] = ""


NOBODY = 65534  # uid and gid of the tests' other user
READER = 65533  # a third user, where nobody owns what another only reads


def fuse_missing_reason() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


def require_fuse() -> None:
    reason = fuse_missing_reason()
    if reason is None:
        return
    if os.environ.get("CAFS_REQUIRE_FUSE"):
        pytest.fail(f"FUSE is required here (CAFS_REQUIRE_FUSE is set) but {reason}")
    print(f"skipping real-mount test: {reason}")
    pytest.skip(reason)


def cafs(*args: str, check: bool = True, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*CAFS, *args], capture_output=True, text=True, env=env,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"cafs {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}{result.stderr}")
    return result


def manifest_sql(store: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple]:
    """A statement run on a store's manifest by hand, as a test breaks or reads rows: on
    manifest.sqlite, or on the PostgreSQL database its manifest.url names (the same SQL:
    cafs.pg_manifest's connection translates it)."""
    url_file = store / "manifest.url"
    if url_file.exists():
        from cafs.pg_manifest.connection import PgConnection

        conn = PgConnection(url_file.read_text().strip())
        try:
            return list(conn.execute(sql, params))
        finally:
            conn.close()
    import sqlite3

    db = sqlite3.connect(store / "manifest.sqlite")
    try:
        with db:
            return list(db.execute(sql, params))
    finally:
        db.close()


def cafs_bytes(*args: str) -> bytes:
    """Run cafs and return its standard output as bytes (cafs cat)."""
    result = subprocess.run([*CAFS, *args], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def log_of(path: Path | str, *store: str) -> list[dict]:
    """`cafs log --json` of a path: its versions, oldest first."""
    return json.loads(cafs("log", "--json", *store, str(path)).stdout)["versions"]


def sh(command: str, *, cwd: Path | None = None, check: bool = True,
       input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, input=input,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{command!r} exited {result.returncode}:\n"
                             f"{result.stdout.decode(errors='replace')}"
                             f"{result.stderr.decode(errors='replace')}")
    return result


def as_nobody(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a shell command as nobody (no groups, nobody's home) in cwd."""
    return as_user(NOBODY, command, cwd)


def as_reader(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a shell command as READER, a third user (neither root nor nobody), in cwd."""
    return as_user(READER, command, cwd)


def as_user(uid: int, command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a shell command as uid (its own group, no others, no home) in cwd."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         "bash", "-c", command],
        cwd=cwd, capture_output=True, text=True, timeout=60,
        env={**os.environ, "HOME": "/nonexistent"})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def xattr(path: Path, name: str) -> str:
    return os.getxattr(path, name).decode()


def small_tmpfs(path: Path, size: str) -> Path:
    """Mount a tmpfs of `size` (e.g. "12m") at path, made here: a store that fills up. The
    caller unmounts it."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=700", "tmpfs", str(path)],
                   check=True)
    return path


def write_artifact(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """open, write (1 MiB at a time), optionally fsync, close. The descriptor is always closed;
    the first failure is the one raised."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:1 << 20]):]
        if fsync:
            os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    os.close(fd)


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == target for line in mounts)


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as dead)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Mount:
    """One store mounted at one mountpoint by a daemon this test started."""

    def __init__(self, store: Path, mountpoint: Path, options: tuple[str, ...] = ()) -> None:
        self.store = store
        self.mountpoint = mountpoint
        self.options = options
        self._log_checked_upto = 0
        # Added to the environment of the commands on this store (a second store in a test
        # on remote back ends gets its own configuration: backends.another_store_env).
        self.env: dict[str, str] | None = None

    @property
    def runs(self) -> Path:
        return self.mountpoint / "runs"

    def layer(self, execution: str = "e1", layer: str = "train") -> Path:
        path = self.runs / execution / layer
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self, env: dict[str, str] | None = None) -> None:
        """Mount; `env` adds to the daemon's environment (e.g. a crash point)."""
        args = ["mount", "--store", str(self.store), str(self.mountpoint)]
        for option in self.options:
            args += ["-o", option]
        extra = {**(self.env or {}), **(env or {})}
        cafs(*args, env={**os.environ, **extra} if extra else None)
        assert is_mounted(self.mountpoint)

    def stop(self) -> None:
        if is_mounted(self.mountpoint):
            cafs("umount", str(self.mountpoint))
        assert not is_mounted(self.mountpoint)

    def daemon_pid(self) -> int:
        text = (self.store / "lock").read_text()
        return int(text.split()[1])

    def kill9(self) -> None:
        """Kill the daemon hard and clear the dead mount it leaves, as an operator would."""
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        assert wait_dead(pid, timeout=10)
        self.clear_dead_mount()
        self.log_problems(accept=True)

    def clear_dead_mount(self) -> None:
        """What an operator (or the unit's ExecStopPost) does after the daemon died."""
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=True)

    def log(self) -> str:
        path = self.store / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_problems(self, accept: bool = False) -> list[str]:
        """Error lines and tracebacks logged since the last check."""
        text = self.log()
        new = text[self._log_checked_upto:]
        if accept:
            self._log_checked_upto = len(text)
            return []
        return [line for line in new.splitlines()
                if " ERROR " in line or " CRITICAL " in line or "Traceback" in line]

    def fsck(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return cafs("fsck", "--store", str(self.store), *extra, check=False,
                    env={**os.environ, **self.env} if self.env else None)

    def assert_clean(self) -> None:
        """What every mount ends with: no error logged, and fsck --full finds no damage."""
        new_log = self.log()[self._log_checked_upto:]
        problems = self.log_problems()
        # The whole of what was logged since the last check: a traceback's lines after its
        # first are what explain it.
        assert not problems, "the daemon logged errors:\n" + new_log[-6000:]
        report = self.fsck("--full")
        assert report.returncode == 0, f"fsck found damage:\n{report.stdout}{report.stderr}"


@pytest.fixture(autouse=True)
def test_backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 monkeypatch: pytest.MonkeyPatch) -> None:
    """CAFS_TEST_BACKEND (see backends.py): a per-test cafs.toml naming fresh remote back
    ends, in CAFS_CONFIG for every `cafs ...` the test runs. Nothing in `local` mode."""
    current_s3.clear()
    current_pg.clear()
    if BACKEND == "local":
        return
    lines: list[str] = []
    if uses("postgresql"):
        lines.append(f'manifest = "{request.getfixturevalue("pg_url")}"')
        current_pg["cluster"] = request.getfixturevalue("pg_cluster")
    if uses("s3"):
        lines += s3_config_lines(request.getfixturevalue("weed"))
    if uses("postgresql") and uses("s3"):
        # One host in these tests: gc reclaims at once, as on the local store. The grace that
        # protects other hosts' readers (default an hour) is tested with two hosts
        # (test_hosts_sessions.py) and in the manifest contract.
        lines.append("gc_grace = 0")
    path = tmp_path_factory.mktemp("backend") / "cafs.toml"
    path.write_text("".join(f"{line}\n" for line in lines))
    monkeypatch.setenv("CAFS_CONFIG", str(path))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def mount_with_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str) -> Mount:
    """A started mount of a new store under tmp_path, its configuration file holding `config`
    (how the S3 tests put blobs on S3 whatever CAFS_TEST_BACKEND says)."""
    require_fuse()
    path = tmp_path / "cafs.toml"
    path.write_text(config)
    monkeypatch.setenv("CAFS_CONFIG", str(path))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir(exist_ok=True)
    mounted = Mount(tmp_path / "store", mountpoint)
    mounted.start()
    return mounted


@contextlib.contextmanager
def checked_after(mounted: Mount) -> Iterator[Mount]:
    """Yields the mount; then unmounts it and requires a clean log and a clean fsck --full."""
    try:
        yield mounted
    finally:
        unmount_whatever_state(mounted.mountpoint)
    assert mounted.log_problems() == []
    report = mounted.fsck("--full")
    assert report.returncode == 0, report.stdout + report.stderr


def unmount_whatever_state(mountpoint: Path) -> None:
    """Test clean-up: unmount cleanly if possible, else detach a dead or busy mount."""
    if is_mounted(mountpoint):
        subprocess.run([*CAFS, "umount", str(mountpoint)], capture_output=True)
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)])


@pytest.fixture
def unstarted_mount(store: Path, mountpoint: Path) -> Iterator[Mount]:
    """A Mount the test starts, stops (and crashes) itself; unmounted whatever happens."""
    require_fuse()
    try:
        yield Mount(store, mountpoint)
    finally:
        unmount_whatever_state(mountpoint)


@pytest.fixture
def mount(store: Path, mountpoint: Path) -> Iterator[Mount]:
    require_fuse()
    mounted = Mount(store, mountpoint)
    mounted.start()
    try:
        yield mounted
    finally:
        unmount_whatever_state(mountpoint)
    mounted.assert_clean()


@contextlib.contextmanager
def started(mount: Mount, *options: str) -> Iterator[Mount]:
    """`mount` started with these -o options; stopped and checked clean at the end."""
    mount.options = options
    mount.start()
    yield mount
    mount.stop()
    mount.assert_clean()


@contextlib.contextmanager
def reachable_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory every user can reach (tmp_path is 0700), removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix=prefix))
    parent.chmod(0o755)
    try:
        yield parent
    finally:
        shutil.rmtree(parent)


@contextlib.contextmanager
def mounted_for_everyone(store: Path, parent: Path) -> Iterator[Mount]:
    """Mounted by root with allow_other at parent/mnt (parent: one other users can reach);
    stopped and checked clean at the end."""
    mountpoint = parent / "mnt"
    mountpoint.mkdir()
    mount = Mount(store, mountpoint, options=("allow_other",))
    mount.start()
    try:
        yield mount
        mount.stop()
    finally:
        unmount_whatever_state(mountpoint)
    mount.assert_clean()


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    """A small pipeline-like output directory: text, binary, nested, an empty file."""
    root = tmp_path / "outdir"
    (root / "metrics" / "per_epoch").mkdir(parents=True)
    (root / "weights").mkdir()
    (root / "empty.txt").write_bytes(b"")
    (root / "metrics" / "summary.json").write_text('{"loss": 0.125, "acc": 0.97}\n' * 50)
    for epoch in range(5):
        rows = "".join(f"{epoch},{step},{step * 0.5:.3f}\n" for step in range(2000))
        (root / "metrics" / "per_epoch" / f"epoch{epoch}.csv").write_text(rows)
    (root / "weights" / "model.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "weights" / "small.bin").write_bytes(os.urandom(100))
    os.utime(root / "metrics" / "summary.json", ns=(1_600_000_000_000_000_000,) * 2)
    return root


# -- stores made by older code ---------------------------------------------------------------

# The last commit before schema m006 (symlinks) and m007 (path histories): migration tests
# make a store with its code, then open it with this checkout's.
BEFORE_M006 = "25ddbafcb09f641c6f298802aae61c6bbb79090b"
REPO = Path(__file__).resolve().parent.parent


def code_of(commit: str, into: Path) -> Path:
    """The cafs package as it was at `commit`, unpacked under `into` (run it with old_cafs).
    CI clones the whole history; a shallow copy without the commit cannot run the test."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "cafs"],
                             capture_output=True, timeout=60)
    if archive.returncode != 0:
        if os.environ.get("CI") or os.environ.get("CAFS_REQUIRE_FUSE"):
            raise AssertionError(f"commit {commit[:12]} is not in this checkout's history")
        pytest.skip(f"commit {commit[:12]} is not in this checkout's history (a shallow clone)")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def old_cafs(code: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the cafs command of older code unpacked by code_of."""
    result = subprocess.run([sys.executable, "-m", "cafs", *args], cwd=code,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result

