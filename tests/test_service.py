"""Running as a systemd service and from fstab, tested without systemd as PID 1.

The units are checked with systemd-analyze; a harness plays systemd's part: it binds the notify
socket, runs the unit's own ExecStart and ExecStopPost lines, and watches READY/WATCHDOG/STOPPING.
"""

from __future__ import annotations

import configparser
import errno
import itertools
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, cafs, is_mounted, require_fuse, sh

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
VENV_CAFS = str(Path(sys.executable).parent / "cafs")
# Options that give a service a private mount namespace: a FUSE mount made there is invisible.
NAMESPACE_OPTIONS = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "BindPaths", "BindReadOnlyPaths",
    "TemporaryFileSystem", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "MountFlags",
}


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def unit_command(key: str, config: Path) -> list[str]:
    """A command line of cafs.service, pointed at this checkout and a test configuration."""
    line = unit("cafs.service")["Service"][key].lstrip("-")
    args = shlex.split(line.replace("/etc/cafs/cafs.toml", str(config)))
    assert args[0] == "/usr/bin/cafs"
    return [VENV_CAFS, *args[1:]]


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (apt-get install systemd)")
    names = ["cafs.service", "cafs-scrub.service", "cafs-scrub.timer"]
    for name in names:  # ExecStart paths must exist: stub them in a temp copy
        text = (UNITS / name).read_text().replace("/usr/bin/cafs", "/bin/true")
        (tmp_path / name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    scrub = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                            str(tmp_path / "cafs-scrub.service")], capture_output=True, text=True)
    exposure = float(scrub.stdout.rsplit("exposure level for cafs-scrub.service:", 1)[1].split()[0])
    assert exposure <= 2.0, scrub.stdout


def test_mount_unit_keeps_the_mount_in_the_host_namespace() -> None:
    service = unit("cafs.service")["Service"]
    assert not NAMESPACE_OPTIONS & set(service), "an option would hide the FUSE mount"
    assert service["Type"] == "notify"
    assert "3" in service["RestartPreventExitStatus"].split()
    assert service["Restart"] == "on-failure"
    assert int(service["LimitNOFILE"]) >= 65536
    text = (UNITS / "cafs.service").read_text()
    assert "ProtectSystem" in text and "mount namespace" in text  # said why, in a comment


class Notifications:
    """systemd's end of the notify protocol: a datagram socket, path or abstract."""

    def __init__(self, tmp_path: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"cafs-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = str(tmp_path / "notify.sock")
            self.sock.bind(self.address)
        self.received: list[tuple[float, str]] = []

    def wait_for(self, message: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        for at, seen in self.received:
            if seen == message:
                return at
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            now = time.monotonic()
            for line in data.decode().splitlines():
                self.received.append((now, line))
                if line == message:
                    return now
        raise AssertionError(f"no {message} within {timeout}s; got {self.received}")

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        """Everything that arrives in the next `seconds`, with its time of arrival."""
        deadline = time.monotonic() + seconds
        got = []
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            got += [(time.monotonic(), line) for line in data.decode().splitlines()]
        self.received += got
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def service_config(tmp_path: Path) -> Iterator[Path]:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = tmp_path / "cafs.toml"
    config.write_text(f'store = "{tmp_path / "store"}"\nmountpoint = "{mnt}"\n'
                      "allow_other = true\ncompression = 1\n")
    yield config
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


def start_service(config: Path, notify: Notifications, watchdog_usec: int = 0
                  ) -> subprocess.Popen[bytes]:
    env = dict(os.environ, NOTIFY_SOCKET=notify.address)
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return subprocess.Popen(unit_command("ExecStart", config), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("abstract", [False, True], ids=["path-socket", "abstract-socket"])
def test_notify_ready_watchdog_and_clean_stop(service_config: Path, tmp_path: Path,
                                              abstract: bool) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    # Something to read the moment READY arrives.
    seed = Mount(store, mnt)
    seed.start()
    (seed.layer() / "model.bin").write_bytes(b"weights" * 1000)
    seed.stop()

    notify = Notifications(tmp_path, abstract)
    daemon = start_service(service_config, notify, watchdog_usec=400_000)
    try:
        notify.wait_for("READY=1")
        # READY means serving: the read works at once and the mount is in the table.
        assert (mnt / "runs" / "e1" / "train" / "model.bin").read_bytes() == b"weights" * 1000
        assert is_mounted(mnt)
        # Pings come every half of WatchdogSec (0.4 s here, so every 0.2 s).
        pings = [at for at, text in notify.collect(seconds=1.5) if text == "WATCHDOG=1"]
        assert len(pings) >= 5, notify.received
        gaps = sorted(later - earlier for earlier, later in itertools.pairwise(pings))
        assert 0.1 < gaps[len(gaps) // 2] < 0.4, gaps
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        notify.wait_for("STOPPING=1", timeout=5)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        notify.close()
    assert not is_mounted(mnt)
    assert not (store / "dirty").exists()
    assert b"Traceback" not in daemon.stderr.read()  # type: ignore[union-attr]


def test_kill9_exec_stop_post_then_restart(service_config: Path, tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    notify = Notifications(tmp_path, abstract=False)
    daemon = start_service(service_config, notify)
    try:
        notify.wait_for("READY=1")
        layer = mnt / "runs" / "e1" / "train"
        layer.mkdir(parents=True)
        expected = {f"a{i}": os.urandom(1000 * i) for i in range(20)}
        for name, data in expected.items():
            (layer / name).write_bytes(data)
        daemon.kill()
        daemon.wait(timeout=10)
        with pytest.raises(OSError) as info:
            os.listdir(mnt)
        assert info.value.errno == errno.ENOTCONN  # the dead mount a crash leaves
        cleared = subprocess.run(unit_command("ExecStopPost", service_config),
                                 capture_output=True, text=True)
        assert cleared.returncode == 0, cleared.stderr
        assert not is_mounted(mnt)
        # Restart=on-failure runs ExecStart again: it mounts, and every closed artifact is there.
        notify.received.clear()
        daemon = start_service(service_config, notify)
        notify.wait_for("READY=1")
        assert {p.name: p.read_bytes() for p in layer.iterdir()} == expected
        # ExecStopPost after a clean stop has nothing to do, and says nothing.
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        again = subprocess.run(unit_command("ExecStopPost", service_config),
                               capture_output=True, text=True)
        assert again.returncode == 0 and again.stderr == ""
    finally:
        if daemon.poll() is None:
            daemon.kill()
        notify.close()
    log = daemon.stderr.read().decode()  # type: ignore[union-attr]
    assert "did not stop cleanly" in log and "Traceback" not in log
    assert cafs("fsck", "--full", "--store", str(store)).returncode == 0


def test_a_store_damaged_by_a_crash_stops_the_restart_loop(service_config: Path,
                                                            tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    notify = Notifications(tmp_path, abstract=False)
    daemon = start_service(service_config, notify)
    try:
        notify.wait_for("READY=1")
        layer = mnt / "runs" / "e1" / "l"
        layer.mkdir(parents=True)
        (layer / "x").write_bytes(b"newest content")
        digest = os.getxattr(layer / "x", "user.cafs.sha256").decode()
        daemon.kill()
        daemon.wait(timeout=10)
    finally:
        notify.close()
    subprocess.run(unit_command("ExecStopPost", service_config), check=True)
    (store / "blobs" / digest[:2] / digest).unlink()
    result = subprocess.run(unit_command("ExecStart", service_config), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3  # listed in RestartPreventExitStatus: no crash loop
    assert "needs repair" in result.stderr and "Traceback" not in result.stderr
    assert not is_mounted(mnt)


def test_mount_helper_form_and_fstab_line(tmp_path: Path) -> None:
    """mount(8) with fstab options runs `cafs STORE MOUNTPOINT -o OPTS` through mount.fuse3.

    The fuse type's PROGRAM#SOURCE form runs this checkout's cafs without installing it."""
    require_fuse()
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    options = "defaults,rw,noauto,nofail,_netdev,x-systemd.automount,allow_other,dev,suid"
    sh(f"mount -t fuse '{VENV_CAFS}#{store}' {mnt} -o {options}")
    try:
        line = next(entry for entry in Path("/proc/mounts").read_text().splitlines()
                    if entry.split()[1] == str(mnt))
        source, _, fstype, flags = line.split()[:4]
        assert (source, fstype) == (str(store), "fuse.cafs")
        assert {"nodev", "nosuid", "allow_other"} <= set(flags.split(","))
        (mnt / "runs" / "e").mkdir()
        (mnt / "runs" / "e" / "l").mkdir()
        (mnt / "runs" / "e" / "l" / "f").write_text("via mount(8)")
    finally:
        cafs("umount", str(mnt))
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{VENV_CAFS}#{store} {mnt} fuse nodev,nosuid,noatime,allow_other,"
                     "default_permissions,nofail 0 0\n")
    sh(f"mount --fstab {fstab} {mnt}")
    try:
        assert (mnt / "runs" / "e" / "l" / "f").read_text() == "via mount(8)"
    finally:
        cafs("umount", str(mnt))


def test_install_then_mount_t_fuse_cafs_then_uninstall(tmp_path: Path) -> None:
    """The real system-wide install: /usr/bin/cafs is what mount(8) finds (it ignores PATH)."""
    require_fuse()
    if os.geteuid() != 0:
        pytest.skip("installing system-wide needs root")
    had_install = Path("/usr/bin/cafs").exists()
    had_config = Path("/etc/cafs/cafs.toml").exists()
    sh(f"{ROOT}/scripts/install")
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    try:
        assert os.path.realpath("/usr/bin/cafs") == "/opt/cafs/venv/bin/cafs"
        for name in ("cafs.service", "cafs-scrub.service", "cafs-scrub.timer"):
            assert (Path("/etc/systemd/system") / name).read_text() == (UNITS / name).read_text()
        assert Path("/etc/cafs/cafs.toml").exists()
        sh(f"mount -t fuse.cafs {store} {mnt} -o defaults,nofail,allow_other")
        assert is_mounted(mnt)
        (mnt / "runs" / "e").mkdir()
        sh(f"/usr/bin/cafs umount {mnt}")
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        if not had_install:
            sh(f"{ROOT}/scripts/install --uninstall")
            assert not Path("/usr/bin/cafs").exists()
            assert not Path("/etc/systemd/system/cafs.service").exists()
            assert Path("/etc/cafs/cafs.toml").exists()  # configuration is kept
            if not had_config:
                shutil.rmtree("/etc/cafs")
