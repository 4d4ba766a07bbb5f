"""Mistakes caught early and every command scriptable (issue 15): mountpoint checks, the
configuration in use, progress on a terminal only, --json everywhere, exit codes, import into a
new store, refused writes explained in the daemon's log, atime kept."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import (
    Mount,
    as_nobody,
    cafs,
    is_mounted,
    reachable_dir,
    require_fuse,
    unmount_whatever_state,
)
from test_security import cafs_for_nobody


def one_line_failure(result: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- the mountpoint ------------------------------------------------------------------------


def test_mount_refuses_a_nonempty_mountpoint_unless_asked(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "notes.txt").write_text("mine\n")
    store = tmp_path / "store"
    try:
        one_line_failure(cafs("mount", "--store", str(store), str(mnt), check=False), 4,
                         "is not empty")
        assert not is_mounted(mnt)
        for asked in (["--nonempty"], ["-o", "nonempty"]):
            cafs("mount", "--store", str(store), *asked, str(mnt))
            assert is_mounted(mnt) and (mnt / "runs").is_dir()
            cafs("umount", str(mnt))
        assert (mnt / "notes.txt").read_text() == "mine\n"
    finally:
        unmount_whatever_state(mnt)


def test_mount_refuses_a_mountpoint_already_mounted(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    first = Mount(tmp_path / "store1", mnt)
    first.start()
    try:
        # A live cafs mount (of another store), and an empty tmpfs.
        one_line_failure(cafs("mount", "--store", str(tmp_path / "store2"), str(mnt),
                              check=False), 4, "is already mounted")
        first.stop()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
        try:
            one_line_failure(cafs("mount", "--store", str(tmp_path / "store2"), str(mnt),
                                  check=False), 4, "already mounted (tmpfs")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        assert not is_mounted(mnt)
    finally:
        unmount_whatever_state(mnt)
    first.assert_clean()


# -- which configuration file -------------------------------------------------------------


def status_json(*args: str, env: dict[str, str]) -> dict[str, object]:
    result = cafs("status", "--json", *args, env=env)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_the_system_configuration_is_root_s_and_status_says_which(tmp_path: Path) -> None:
    system = tmp_path / "system.toml"
    system.write_text(f'store = "{tmp_path / "system-store"}"\nmountpoint = "/mnt/cafs"\n'
                      "allow_other = true\n")
    env = {key: value for key, value in os.environ.items() if key != "CAFS_CONFIG"}
    env["CAFS_SYSTEM_CONFIG"] = str(system)
    env.pop("CAFS_STORE", None)
    # Root (the operator of the service) gets it without naming it, and is told so.
    found = status_json(env=env)
    assert found["config"] == str(system) and "system" in str(found["config_source"])
    assert found["store"] == str(tmp_path / "system-store")
    assert found["store_source"] == "the configuration file"
    text = cafs("status", env=env).stdout
    assert str(system) in text and str(tmp_path / "system-store") in text
    # Another user never gets it silently: their own file, else none, and their own store.
    with reachable_dir("cafs-ux-") as home:
        command = (f"env -u CAFS_CONFIG -u CAFS_STORE CAFS_SYSTEM_CONFIG={system} HOME={home} "
                   f"XDG_CONFIG_HOME={home}/cfg {cafs_for_nobody()} status --json")
        seen = json.loads(as_nobody(command, home).stdout)
        assert seen["config"] is None, seen
        assert seen["store"] == f"{home}/.local/share/cafs"
        (home / "cfg" / "cafs").mkdir(parents=True)
        own = home / "cfg" / "cafs" / "cafs.toml"
        own.write_text(f'store = "{home}/mine"\n')
        own.chmod(0o644)
        (home / "cfg").chmod(0o755)
        (home / "cfg" / "cafs").chmod(0o755)
        seen = json.loads(as_nobody(command, home).stdout)
        assert seen["config"] == str(own) and seen["store"] == f"{home}/mine", seen
    # Named explicitly, any file is used, whoever runs it.
    named = status_json("--config", str(system), env={**env, "CAFS_SYSTEM_CONFIG": "/none"})
    assert named["config"] == str(system) and named["config_source"] == "--config"


def test_mount_says_which_store_and_configuration(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = tmp_path / "mine.toml"
    config.write_text(f'store = "{tmp_path / "store"}"\ncompression = 5\n')
    try:
        result = cafs("mount", "--config", str(config), "--verbose", "--json", str(mnt))
        said = json.loads(result.stdout)
        assert said["store"] == str(tmp_path / "store") and said["config"] == str(config)
        assert f"store {tmp_path / 'store'}" in result.stderr and str(config) in result.stderr
        log = (tmp_path / "store" / "daemon.log").read_text()
        assert f"mounting store {tmp_path / 'store'} at {mnt} (configuration: {config})" in log
        status = status_json("--config", str(config), env=dict(os.environ))
        assert status["mounted_at"] == [str(mnt)] and status["daemon_pid"] == said["pid"]
    finally:
        unmount_whatever_state(mnt)
